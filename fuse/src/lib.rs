//! Lazy layers for Shoal.
//!
//! | module | what |
//! |---|---|
//! | [`estargz`] | the eStargz format: footer, TOC (`stargz.index.json`), reader and writer |
//! | [`index`] | a layer's checked file tree, built from its TOC |
//! | [`source`] | [`ChunkSource`]: where the compressed bytes come from |
//! | [`cache`] | the bounded cache of verified, inflated chunks |
//! | [`fs`] | the FUSE filesystem presenting one layer, and its mount guard |
//!
//! This crate knows nothing of gRPC, containerd or the swarm: the node plugs the swarm in by
//! implementing [`ChunkSource`].

pub mod cache;
pub mod estargz;
pub mod fs;
pub mod index;
pub mod source;

pub use cache::ChunkCache;
pub use estargz::Layer;
pub use fs::{FsOptions, FsStats, LayerMount, unmount_stale};
pub use index::{Index, Ino, Kind, Node};
pub use source::{ChunkSource, FileSource};
