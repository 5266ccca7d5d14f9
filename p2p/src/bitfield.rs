//! A fixed-length set of piece indices: which pieces a peer has, wants or is fetching.

/// A bitset over `0..len`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitfield {
    words: Vec<u64>,
    len: u32,
    ones: u32,
}

impl Bitfield {
    pub fn new(len: u32) -> Self {
        Self {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            ones: 0,
        }
    }

    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of indices present.
    pub fn count(&self) -> u32 {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds `i`; returns whether it was new. Indices out of range are ignored.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.words[(i / 64) as usize] |= 1 << (i % 64);
        self.ones += 1;
        true
    }

    pub fn clear(&mut self, i: u32) {
        if self.get(i) {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
            self.ones -= 1;
        }
    }

    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }

    /// Packed big-endian bytes, BitTorrent style: bit 7 of byte 0 is piece 0.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; (self.len as usize).div_ceil(8)];
        for i in self.iter_ones() {
            out[(i / 8) as usize] |= 0x80 >> (i % 8);
        }
        out
    }

    /// Parses packed bytes for `len` pieces; `None` if the length is wrong or spare bits are set.
    pub fn from_bytes(bytes: &[u8], len: u32) -> Option<Self> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let mut b = Self::new(len);
        for (byte_index, byte) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if byte & (0x80 >> bit) != 0 {
                    let i = byte_index as u32 * 8 + bit;
                    if i >= len {
                        return None;
                    }
                    b.set(i);
                }
            }
        }
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count() {
        let mut b = Bitfield::new(130);
        assert!(b.set(0) && b.set(129) && !b.set(129) && !b.set(130));
        assert_eq!(b.count(), 2);
        assert!(b.get(129) && !b.get(128) && !b.get(1000));
        b.clear(0);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![129]);
        assert!(Bitfield::full(3).is_full());
    }

    #[test]
    fn bytes_round_trip_and_reject_garbage() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        let bytes = b.to_bytes();
        assert_eq!(bytes, vec![0x80, 0x40]);
        assert_eq!(Bitfield::from_bytes(&bytes, 10), Some(b));
        assert_eq!(Bitfield::from_bytes(&[0x80], 10), None, "short");
        assert_eq!(Bitfield::from_bytes(&[0, 0x20], 10), None, "spare bit set");
    }
}
