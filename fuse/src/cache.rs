//! [`ChunkCache`]: a bounded cache of verified, inflated chunks, shared by every reader of a layer.
//!
//! A FUSE read asks for a few pages; an eStargz chunk is up to megabytes of gzip that must be
//! fetched, inflated and hashed as a whole before any byte of it may be returned. So chunks are
//! kept, least recently used first out, until their inflated bytes exceed the budget.
//!
//! Fetches are single-flight: when several readers miss the same chunk at once (the kernel's
//! readahead and the application's own read often do), one of them fetches it and the others wait
//! for its result. A failed fetch is handed to everyone waiting on it and then forgotten, so the
//! next read tries again. Only the caller's closure decides what "verified" means: the cache
//! stores whatever it returns successfully.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use lru::LruCache;

use crate::index::Chunk;

/// Identifies one chunk's bytes within a layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// Where the chunk's gzip member starts in the blob.
    pub compressed_start: u64,
    /// How far into the inflated member the chunk begins.
    pub inner_offset: u64,
    /// The chunk's uncompressed length.
    pub size: u64,
    /// Its `chunkDigest`: two TOC entries naming the same bytes with different digests must
    /// not share a verified chunk.
    pub digest: [u8; 32],
}

impl From<&Chunk> for ChunkKey {
    fn from(chunk: &Chunk) -> Self {
        ChunkKey {
            compressed_start: chunk.compressed.start,
            inner_offset: chunk.inner_offset,
            size: chunk.size,
            digest: chunk.digest,
        }
    }
}

/// Why [`ChunkCache::get_or_fetch`] has no bytes to return.
#[derive(Debug, PartialEq, Eq)]
pub enum FetchError<E> {
    /// This call ran the fetch, and it failed with this error.
    Failed(E),
    /// This call waited on another reader's fetch of the same chunk, which failed (that reader
    /// got the error itself).
    FailedElsewhere,
}

/// Counters since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Fetches run (successful or not).
    pub fetches: u64,
    /// Lookups that waited on a fetch already under way.
    pub joined: u64,
    /// Chunks evicted to stay within the budget.
    pub evictions: u64,
    /// Inflated bytes held now.
    pub bytes: u64,
}

/// The bounded, single-flight chunk cache.
pub struct ChunkCache {
    capacity: u64,
    state: Mutex<State>,
    hits: AtomicU64,
    fetches: AtomicU64,
    joined: AtomicU64,
    evictions: AtomicU64,
}

struct State {
    chunks: LruCache<ChunkKey, Arc<Vec<u8>>>,
    bytes: u64,
    in_flight: HashMap<ChunkKey, Arc<Flight>>,
}

/// One fetch under way, which late readers wait on.
#[derive(Default)]
struct Flight {
    outcome: Mutex<Option<Option<Arc<Vec<u8>>>>>,
    done: Condvar,
}

impl Flight {
    fn finish(&self, bytes: Option<Arc<Vec<u8>>>) {
        *lock(&self.outcome) = Some(bytes);
        self.done.notify_all();
    }

    fn wait(&self) -> Option<Arc<Vec<u8>>> {
        let mut outcome = lock(&self.outcome);
        loop {
            if let Some(bytes) = outcome.as_ref() {
                return bytes.clone();
            }
            outcome = self
                .done
                .wait(outcome)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Ends a flight however the fetch ends, a panic included, so no waiter is left hanging.
struct FlightGuard<'a> {
    cache: &'a ChunkCache,
    key: ChunkKey,
    flight: Arc<Flight>,
    result: Option<Arc<Vec<u8>>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.cache.state);
            state.in_flight.remove(&self.key);
            if let Some(bytes) = &self.result {
                self.cache.insert(&mut state, self.key, bytes.clone());
            }
        }
        self.flight.finish(self.result.take());
    }
}

impl ChunkCache {
    /// A cache holding at most `capacity` bytes of inflated chunks.
    pub fn new(capacity: u64) -> Self {
        ChunkCache {
            capacity,
            state: Mutex::new(State {
                chunks: LruCache::unbounded(),
                bytes: 0,
                in_flight: HashMap::new(),
            }),
            hits: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The chunk `key`, from the cache or else from `fetch` (run by at most one caller per key
    /// at a time; the others wait for it). A chunk larger than the whole budget is returned but
    /// not kept.
    pub fn get_or_fetch<E>(
        &self,
        key: ChunkKey,
        fetch: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Arc<Vec<u8>>, FetchError<E>> {
        let flight = {
            let mut state = lock(&self.state);
            if let Some(bytes) = state.chunks.get(&key) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(bytes.clone());
            }
            if let Some(flight) = state.in_flight.get(&key) {
                let flight = flight.clone();
                drop(state);
                self.joined.fetch_add(1, Ordering::Relaxed);
                return flight.wait().ok_or(FetchError::FailedElsewhere);
            }
            let flight = Arc::new(Flight::default());
            state.in_flight.insert(key, flight.clone());
            flight
        };
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let mut guard = FlightGuard {
            cache: self,
            key,
            flight,
            result: None,
        };
        // The inflated buffer is kept as it is: no copy of a 4 MiB chunk into a new allocation.
        let bytes = Arc::new(fetch().map_err(FetchError::Failed)?);
        guard.result = Some(bytes.clone());
        Ok(bytes)
    }

    /// Whether `key` is held or being fetched (without touching its place in the LRU order).
    pub fn has(&self, key: &ChunkKey) -> bool {
        let state = lock(&self.state);
        state.chunks.peek(key).is_some() || state.in_flight.contains_key(key)
    }

    /// The counters, and the bytes held now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            joined: self.joined.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: lock(&self.state).bytes,
        }
    }

    fn insert(&self, state: &mut State, key: ChunkKey, bytes: Arc<Vec<u8>>) {
        let len = bytes.len() as u64;
        if len > self.capacity {
            return;
        }
        while state.bytes + len > self.capacity {
            let Some((_, evicted)) = state.chunks.pop_lru() else {
                break;
            };
            state.bytes -= evicted.len() as u64;
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(old) = state.chunks.put(key, bytes) {
            state.bytes -= old.len() as u64;
        }
        state.bytes += len;
    }
}

impl fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section here leaves the state consistent
/// before anything in it can panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;
    use std::thread;
    use std::time::Duration;

    use super::*;

    fn key(start: u64) -> ChunkKey {
        ChunkKey {
            compressed_start: start,
            inner_offset: 0,
            size: 10,
            digest: [0; 32],
        }
    }

    /// Polls until another reader has joined the fetch under way.
    fn wait_for_joiner(cache: &ChunkCache) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cache.stats().joined == 0 {
            assert!(std::time::Instant::now() < deadline, "no reader joined");
            thread::yield_now();
        }
    }

    #[test]
    fn hit_after_fetch() -> anyhow::Result<()> {
        let cache = ChunkCache::new(100);
        let got = cache.get_or_fetch(key(0), || Ok::<_, ()>(vec![1; 10]));
        assert_eq!(got.as_deref().map(Vec::as_slice), Ok(&[1u8; 10][..]));
        let got = cache.get_or_fetch(key(0), || Err("must not fetch again"));
        assert_eq!(got.as_deref().map(Vec::as_slice), Ok(&[1u8; 10][..]));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.fetches, stats.bytes), (1, 1, 10));
        Ok(())
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_bytes() {
        let cache = ChunkCache::new(25);
        for start in [0, 1] {
            let _ = cache.get_or_fetch(key(start), || Ok::<_, ()>(vec![0; 10]));
        }
        // Touch chunk 0 so chunk 1 is the least recently used.
        let _ = cache.get_or_fetch(key(0), || Err(()));
        let _ = cache.get_or_fetch(key(2), || Ok::<_, ()>(vec![0; 10]));
        assert!(cache.get_or_fetch(key(1), || Err(())).is_err());
        assert!(cache.get_or_fetch(key(0), || Err(())).is_ok());
        let stats = cache.stats();
        assert_eq!((stats.bytes, stats.evictions), (20, 1));
    }

    #[test]
    fn oversized_chunk_is_returned_but_not_kept() {
        let cache = ChunkCache::new(5);
        let got = cache.get_or_fetch(key(0), || Ok::<_, ()>(vec![7; 10]));
        assert_eq!(got.map(|b| b.len()), Ok(10));
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn failure_is_not_cached() {
        let cache = ChunkCache::new(100);
        let got = cache.get_or_fetch(key(0), || Err::<Vec<u8>, _>("offline"));
        assert_eq!(got, Err(FetchError::Failed("offline")));
        let got = cache.get_or_fetch(key(0), || Ok::<_, &str>(vec![2; 10]));
        assert_eq!(got.map(|b| b[0]), Ok(2));
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let cache = ChunkCache::new(100);
        let fetches = AtomicUsize::new(0);
        let readers = 8;
        let barrier = Barrier::new(readers);
        thread::scope(|s| {
            for _ in 0..readers {
                s.spawn(|| {
                    barrier.wait();
                    let got = cache.get_or_fetch(key(0), || {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        // Long enough for every other reader to arrive and join.
                        thread::sleep(Duration::from_millis(200));
                        Ok::<_, ()>(vec![3; 10])
                    });
                    assert_eq!(got.map(|b| b[9]), Ok(3));
                });
            }
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!(stats.fetches, 1);
        assert_eq!(stats.hits + stats.joined, readers as u64 - 1);
    }

    #[test]
    fn waiters_share_a_failure_and_the_next_read_retries() {
        let cache = ChunkCache::new(100);
        let started = Barrier::new(2);
        thread::scope(|s| {
            let leader = s.spawn(|| {
                cache.get_or_fetch(key(0), || {
                    started.wait();
                    wait_for_joiner(&cache);
                    Err::<Vec<u8>, _>("timeout")
                })
            });
            started.wait();
            let waiter = cache.get_or_fetch(key(0), || Ok::<_, &str>(vec![0; 10]));
            assert_eq!(waiter, Err(FetchError::FailedElsewhere));
            assert_eq!(leader.join().ok(), Some(Err(FetchError::Failed("timeout"))));
        });
        assert!(
            cache
                .get_or_fetch(key(0), || Ok::<_, ()>(vec![0; 10]))
                .is_ok()
        );
    }

    #[test]
    fn a_panicking_fetch_releases_its_waiters() {
        let cache = ChunkCache::new(100);
        let started = Barrier::new(2);
        thread::scope(|s| {
            let leader = s.spawn(|| {
                cache.get_or_fetch(key(0), || -> Result<Vec<u8>, ()> {
                    started.wait();
                    wait_for_joiner(&cache);
                    panic!("fetch panicked")
                })
            });
            started.wait();
            let waiter = cache.get_or_fetch(key(0), || Ok::<_, ()>(vec![0; 10]));
            assert_eq!(waiter, Err(FetchError::FailedElsewhere));
            assert!(leader.join().is_err());
        });
    }
}
