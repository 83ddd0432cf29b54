//! Integration tests (one binary).

mod vm_sanity;
