//! The tracker: who has which blob, and the authority on every blob's metainfo.
//!
//! Peers announce each blob they download or seed; the tracker answers with a bounded random
//! subset of the other peers (completed ones first), so the swarm forms a random graph rather
//! than a star around whoever finished first. Entries expire when a peer stops announcing.
//!
//! The tracker also decides who may fetch a blob from the upstream registry (the *back-source
//! lease*): a seed when there is one (chosen by rendezvous hashing of the digest, so one seed
//! caches each blob), otherwise at most [`TrackerConfig::max_backsourcers`] nodes. Only a lease
//! holder may publish piece hashes, which it does as each piece arrives from upstream; everyone
//! else verifies pieces against them. The HTTP/JSON API is in [`api`]; [`server::run`] serves it
//! and [`client::TrackerClient`] speaks it.

pub mod api;
pub mod client;
pub mod server;
mod state;

pub use client::TrackerClient;
pub use server::{TrackerConfig, run};
