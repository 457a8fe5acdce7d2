//! What the prefix cache's index gains and loses, for a router to mirror (vLLM's KV-cache
//! events): blocks stored (chains of full blocks with their parent and token ids) and blocks
//! removed (evicted for reuse, or forgotten by a flush). Each replica sends one batch per step
//! that changed its index over a channel; what becomes of it (msgpack over ZMQ) is
//! `crate::kv_events`'s business.

use std::time::SystemTime;

use super::block_hash::BlockHash;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Full blocks the index gained, in chain order: `parent` is the block before the first
    /// (`None`: the first block of a sequence); `token_ids` holds every block's ids in turn.
    Stored {
        hashes: Vec<BlockHash>,
        parent: Option<BlockHash>,
        token_ids: Vec<u32>,
    },
    /// Blocks whose content the index dropped.
    Removed { hashes: Vec<BlockHash> },
}

/// One step's changes to one replica's index.
#[derive(Clone, Debug)]
pub struct KvEventBatch {
    pub at: SystemTime,
    pub events: Vec<KvEvent>,
}

/// Where a replica sends its batches; it never waits on the receiver.
pub type KvEventSink = tokio::sync::mpsc::UnboundedSender<KvEventBatch>;
