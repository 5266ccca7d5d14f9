//! The snapshotter over gRPC, in-process, modelled on containerd's snapshotter test suite
//! (`core/snapshots/testsuite`): every RPC and its error codes, metadata that survives a restart,
//! cleanup of crash leftovers, bad input, and real overlay mounts of what it returns.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod harness;
mod lifecycle;
mod metadata;
mod mount;
