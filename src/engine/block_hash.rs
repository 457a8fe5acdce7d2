//! Prefix-cache block hashes in vLLM's `sha256_cbor` scheme, so that a router can compute
//! them from a prompt's token ids.
//!
//! A full block's hash is SHA-256 of the canonical CBOR of the triple `(parent, token ids,
//! extra keys)`: the parent block's 32-byte hash (a byte string), the block's ids (an array of
//! unsigned ints, each in its shortest form), and null (no LoRA, salt or images here). The
//! first block's parent is SHA-256 of the CBOR text string of a seed: vLLM hashes its
//! `PYTHONHASHSEED` there, so a vLLM started with `PYTHONHASHSEED=<seed>` and
//! `--prefix-caching-hash-algo sha256_cbor` hashes blocks exactly as we do. Events carry the
//! 64-bit form vLLM sends by default: the hash's last 8 bytes read big-endian.

use sha2::{Digest, Sha256};

pub type BlockHash = [u8; 32];

/// Hashes blocks from one seed.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    /// The parent of a sequence's first block (vLLM's `NONE_HASH`).
    root: BlockHash,
}

impl BlockHasher {
    pub fn new(seed: &str) -> Self {
        let mut h = Sha256::new();
        cbor_head(&mut h, 3, seed.len() as u64);
        h.update(seed.as_bytes());
        Self {
            root: h.finalize().into(),
        }
    }

    /// The hash of the block holding `tokens` after the block hashed `parent` (`None`: the
    /// first block).
    pub fn hash(&self, parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut h = Sha256::new();
        cbor_head(&mut h, 4, 3);
        cbor_head(&mut h, 2, 32);
        h.update(parent.unwrap_or(&self.root));
        cbor_head(&mut h, 4, tokens.len() as u64);
        for &t in tokens {
            cbor_head(&mut h, 0, t as u64);
        }
        h.update([0xf6]); // null: no extra keys
        h.finalize().into()
    }
}

impl Default for BlockHasher {
    fn default() -> Self {
        Self::new(DEFAULT_SEED)
    }
}

/// The seed when none is set: `PYTHONHASHSEED=0`'s, so hashes are the same across replicas
/// and restarts (vLLM draws a random one when the variable is unset).
pub const DEFAULT_SEED: &str = "0";

/// The 64-bit form of a hash that KV events carry (vLLM's default,
/// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`): its last 8 bytes, big-endian.
pub fn external(hash: &BlockHash) -> u64 {
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&hash[24..]);
    u64::from_be_bytes(tail)
}

/// A CBOR data item's head: major type `major`, argument `n` in its shortest form (RFC 8949
/// §4.2.1, what cbor2's canonical mode writes).
fn cbor_head(h: &mut Sha256, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => h.update([m | n as u8]),
        24..=0xff => h.update([m | 24, n as u8]),
        0x100..=0xffff => {
            h.update([m | 25]);
            h.update((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            h.update([m | 26]);
            h.update((n as u32).to_be_bytes());
        }
        _ => {
            h.update([m | 27]);
            h.update(n.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &BlockHash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The CBOR bytes written out by hand and hashed whole: the incremental heads agree.
    #[test]
    fn a_block_hashes_the_canonical_cbor_of_parent_tokens_and_null() {
        let hasher = BlockHasher::new("0");
        let mut seed = Sha256::new();
        seed.update([0x61, b'0']);
        let root: BlockHash = seed.finalize().into();
        assert_eq!(hasher.root, root);

        let tokens = [0u32, 23, 24, 255, 256, 65_535, 65_536, 151_935];
        let mut cbor = vec![0x83, 0x58, 0x20];
        cbor.extend_from_slice(&root);
        cbor.push(0x88);
        cbor.extend([
            0x00, 0x17, 0x18, 0x18, 0x18, 0xff, 0x19, 0x01, 0x00, 0x19, 0xff, 0xff,
        ]);
        cbor.extend([0x1a, 0x00, 0x01, 0x00, 0x00, 0x1a, 0x00, 0x02, 0x51, 0x7f]);
        cbor.push(0xf6);
        let want: BlockHash = Sha256::digest(&cbor).into();
        assert_eq!(hex(&hasher.hash(None, &tokens)), hex(&want));

        // Chained: the parent is the previous block's hash, as a byte string.
        let second = hasher.hash(Some(&want), &[7; 24]);
        let mut cbor = vec![0x83, 0x58, 0x20];
        cbor.extend_from_slice(&want);
        cbor.extend([0x98, 24]);
        cbor.extend([0x07; 24]);
        cbor.push(0xf6);
        assert_eq!(second, <BlockHash>::from(Sha256::digest(&cbor)));
        assert_ne!(
            BlockHasher::new("1").hash(None, &tokens),
            want,
            "the seed matters"
        );
    }

    #[test]
    fn the_external_form_is_the_last_eight_bytes_big_endian() {
        let mut h = [0u8; 32];
        h[24..].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0x01, 0x02]);
        assert_eq!(external(&h), 0x8000_0000_0000_0102);
    }
}
