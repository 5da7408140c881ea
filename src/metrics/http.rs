//! tierd's HTTP listener: `/metrics`, `/health`, `/ready`. (Being built.)
