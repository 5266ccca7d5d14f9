#![doc = include_str!("../README.md")]

pub mod config;
pub mod content;
pub mod convert;
pub mod doctor;
pub mod filters;
mod grpc;
pub mod labels;
pub mod lazy;
mod meta;
pub mod mirror;
pub mod node;
pub mod pull;
pub mod reference;
pub mod snapshotter;
pub mod status;
