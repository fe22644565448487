//! heapcap OCI spec changes (being written).
#![forbid(unsafe_code)]
