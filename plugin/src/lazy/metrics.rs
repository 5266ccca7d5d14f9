//! The lazy layers' counters on the node's `/metrics`: FUSE reads, bytes, chunk fetches and
//! cache hits, passthrough opens, local copies and EIOs, summed over every layer mounted since the node
//! started (a layer's counts are kept when it is unmounted, so the counters never go back).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use shoal_fuse::FsStats;

use super::Lazy;

/// Adds `b` into `a`.
pub(super) fn add(a: &mut FsStats, b: FsStats) {
    a.reads += b.reads;
    a.bytes += b.bytes;
    a.chunk_fetches += b.chunk_fetches;
    a.cache_hits += b.cache_hits;
    a.passthrough_opens += b.passthrough_opens;
    a.local_copies += b.local_copies;
    a.eios += b.eios;
}

impl Collector for Lazy {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (stats, mounted) = self.stats();
        let counters = [
            (
                "shoal_fuse_reads",
                "FUSE read requests answered",
                stats.reads,
            ),
            (
                "shoal_fuse_read_bytes",
                "Bytes returned to FUSE reads",
                stats.bytes,
            ),
            (
                "shoal_fuse_chunk_fetches",
                "eStargz chunks fetched, inflated and verified (cache misses)",
                stats.chunk_fetches,
            ),
            (
                "shoal_fuse_cache_hits",
                "Chunk lookups answered from the chunk cache",
                stats.cache_hits,
            ),
            (
                "shoal_fuse_passthrough_opens",
                "Files opened with FUSE passthrough (read by the kernel directly)",
                stats.passthrough_opens,
            ),
            (
                "shoal_fuse_local_copies",
                "Files given a verified uncompressed local copy (written, or found and checked)",
                stats.local_copies,
            ),
            (
                "shoal_fuse_eio",
                "FUSE requests answered with EIO (no source in time, or bad bytes)",
                stats.eios,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let gauge = ConstGauge::new(mounted as i64);
        let metric = encoder.encode_descriptor(
            "shoal_fuse_mounted_layers",
            "Layers mounted lazily now",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}
