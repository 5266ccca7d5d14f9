//! The content store served in-process on a Unix socket in a tempdir, as `shoal node` serves it
//! to containerd, driven with containerd-client's real `ContentClient`. Writes follow the
//! conversation of containerd's proxy writer (`content/proxy/content_writer.go`): a STAT naming
//! the ref, WRITEs at the current offset, a COMMIT with the size and digest.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod blobs;
mod harness;
mod ingests;
