#![doc = include_str!("../README.md")]

pub mod digest;
pub mod upstream;

pub use digest::Digest;
pub mod bitfield;
pub mod metainfo;
pub mod store;
pub mod swarm;
pub mod tracker;
pub mod wire;
