//! Feeds arbitrary bytes to the TOC decoder and index builder, the trust boundary for a
//! layer's metadata: any input must give an `Index` or an error, never a panic, a hang or an
//! unbounded allocation.
//!
//! The first 8 bytes choose the TOC offset (so offset checks are exercised both ways); the rest
//! is the JSON. Small limits keep each run fast.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fuse::estargz::{Limits, parse_toc};

fuzz_target!(|data: &[u8]| {
    let (offset, json) = match data.split_first_chunk::<8>() {
        Some((offset, json)) => (u64::from_le_bytes(*offset), json),
        None => (0, data),
    };
    let limits = Limits {
        max_toc_compressed: 1 << 20,
        max_toc_json: 1 << 20,
        max_entries: 1 << 12,
    };
    if let Ok(index) = parse_toc(json, offset, &limits) {
        // What the filesystem relies on: every chunk before the TOC, files covered exactly.
        for node in &index.nodes {
            let mut at = 0;
            for chunk in &node.chunks {
                assert_eq!(chunk.file_offset, at);
                assert!(chunk.compressed.start < chunk.compressed.end);
                assert!(chunk.compressed.end <= index.toc_offset);
                at += chunk.size;
            }
            assert!(node.chunks.is_empty() || at == node.size);
        }
    }
});
