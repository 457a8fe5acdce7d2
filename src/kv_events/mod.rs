//! KV-cache events for routers (vllm-router `kv_aware`, llm-d), in vLLM's wire format: each
//! replica's prefix-cache changes ([`crate::engine::KvEventBatch`]) become msgpack batches on a
//! ZMQ PUB socket, and a ZMQ ROUTER socket replays recent ones to a subscriber that missed them.
//!
//! Wire format (vLLM's `ZmqEventPublisher` and `KVEventBatch`, as vllm-router 0.1 decodes it):
//! three frames per message, `[topic, seq as 8 bytes big-endian, payload]`, `seq` counting
//! from 0 per replica. The payload is `[ts, [event, ...], data_parallel_rank]`; each event is
//! a map tagged by `"type"`: `BlockStored {block_hashes, parent_block_hash, token_ids,
//! block_size, lora_id, medium, lora_name}` or `BlockRemoved {block_hashes, medium}`. Hashes
//! go out as unsigned 64-bit ints (`engine::block_hash::external`). Replay: a DEALER sends
//! `[empty, start_seq]`; each buffered batch from `start_seq` on comes back as `[empty, topic,
//! seq, payload]`, then `[empty, empty, -1, empty]` ends the reply.
//!
//! Owns the encoding and the sockets; knows nothing of how blocks are hashed or evicted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedReceiver;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::engine::block_hash::{external, BlockHash};
use crate::engine::{KvEvent, KvEventBatch};

/// Batches kept for replay per replica (vLLM's `buffer_steps` default).
pub const REPLAY_BUFFER: usize = 10_000;

/// Where one replica publishes, as `/kv_event_sources` advertises it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
}

/// Replica `rank`'s endpoints: the configured ones with their port moved up by `rank` (vLLM's
/// rule for data-parallel ranks). Only `tcp://host:port` endpoints are taken.
pub fn source_for_rank(
    endpoint: &str,
    replay_endpoint: Option<&str>,
    topic: &str,
    rank: usize,
) -> Result<Source, String> {
    Ok(Source {
        endpoint: shift_port(endpoint, rank)?,
        replay_endpoint: replay_endpoint.map(|e| shift_port(e, rank)).transpose()?,
        topic: topic.to_string(),
    })
}

fn shift_port(endpoint: &str, by: usize) -> Result<String, String> {
    let bad =
        || format!("{endpoint:?}: a KV events endpoint is tcp://HOST:PORT, e.g. tcp://*:5557");
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let port = u16::try_from(port as usize + by).map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(format!("tcp://{host}:{port}"))
}

/// What a socket binds: `*` (any interface, as vLLM writes it) is 0.0.0.0.
fn bind_address(endpoint: &str) -> String {
    endpoint.replacen("tcp://*:", "tcp://0.0.0.0:", 1)
}

/// Encodes one batch as vLLM's `KVEventBatch`.
pub fn encode(batch: &KvEventBatch, rank: usize, block_size: usize, medium: &str) -> Vec<u8> {
    use rmp::encode::{
        write_array_len, write_f64, write_map_len, write_nil, write_str, write_uint,
    };
    let mut out = Vec::with_capacity(64 + 48 * batch.events.len());
    let ts = batch
        .at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    // Writes to a Vec cannot fail: the results are discarded.
    let w = &mut out;
    let _ = write_array_len(w, 3);
    let _ = write_f64(w, ts);
    let _ = write_array_len(w, batch.events.len() as u32);
    for event in &batch.events {
        match event {
            KvEvent::Stored {
                hashes,
                parent,
                token_ids,
            } => {
                let _ = write_map_len(w, 8);
                let _ = write_str(w, "type");
                let _ = write_str(w, "BlockStored");
                write_hashes(w, hashes);
                let _ = write_str(w, "parent_block_hash");
                match parent {
                    Some(p) => {
                        let _ = write_uint(w, external(p));
                    }
                    None => {
                        let _ = write_nil(w);
                    }
                }
                let _ = write_str(w, "token_ids");
                let _ = write_array_len(w, token_ids.len() as u32);
                for &t in token_ids {
                    let _ = write_uint(w, t as u64);
                }
                let _ = write_str(w, "block_size");
                let _ = write_uint(w, block_size as u64);
                let _ = write_str(w, "lora_id");
                let _ = write_nil(w);
                let _ = write_str(w, "medium");
                let _ = write_str(w, medium);
                let _ = write_str(w, "lora_name");
                let _ = write_nil(w);
            }
            KvEvent::Removed { hashes } => {
                let _ = write_map_len(w, 3);
                let _ = write_str(w, "type");
                let _ = write_str(w, "BlockRemoved");
                write_hashes(w, hashes);
                let _ = write_str(w, "medium");
                let _ = write_str(w, medium);
            }
        }
    }
    let _ = write_uint(w, rank as u64);
    out
}

/// The `block_hashes` field: each hash as the external integer routers compare.
fn write_hashes(w: &mut Vec<u8>, hashes: &[BlockHash]) {
    use rmp::encode::{write_array_len, write_str, write_uint};
    let _ = write_str(w, "block_hashes");
    let _ = write_array_len(w, hashes.len() as u32);
    for h in hashes {
        let _ = write_uint(w, external(h));
    }
}

/// One replica's publisher: what it needs besides its batches.
pub struct Publisher {
    pub source: Source,
    pub rank: usize,
    pub block_size: usize,
    /// Where the blocks live, as vLLM names it: `GPU`, or `DEVICE` for a CPU engine's own
    /// cache (`CPU` would say offloaded to host memory, which routers credit less).
    pub medium: &'static str,
}

type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

impl Publisher {
    /// Binds the sockets (an error names the endpoint), then publishes `batches` until the
    /// engine drops its end; replays from the buffer meanwhile.
    pub async fn start(
        self,
        mut batches: UnboundedReceiver<KvEventBatch>,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        let mut publish = zeromq::PubSocket::new();
        publish
            .bind(&bind_address(&self.source.endpoint))
            .await
            .map_err(|e| format!("KV events endpoint {}: {e}", self.source.endpoint))?;
        let buffer: Buffer = Arc::default();
        let topic = Bytes::from(self.source.topic.clone().into_bytes());
        if let Some(replay) = &self.source.replay_endpoint {
            let mut router = zeromq::RouterSocket::new();
            router
                .bind(&bind_address(replay))
                .await
                .map_err(|e| format!("KV events replay endpoint {replay}: {e}"))?;
            tokio::spawn(serve_replays(router, buffer.clone(), topic.clone()));
        }
        tracing::info!(
            rank = self.rank,
            endpoint = %self.source.endpoint,
            replay = self.source.replay_endpoint.as_deref().unwrap_or("none"),
            "publishing KV-cache events"
        );
        Ok(tokio::spawn(async move {
            let mut seq: u64 = 0;
            while let Some(batch) = batches.recv().await {
                let payload = Bytes::from(encode(&batch, self.rank, self.block_size, self.medium));
                let frames = vec![
                    topic.clone(),
                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                    payload.clone(),
                ];
                if let Ok(mut kept) = buffer.lock() {
                    if kept.len() == REPLAY_BUFFER {
                        kept.pop_front();
                    }
                    kept.push_back((seq, payload));
                }
                if let Ok(message) = ZmqMessage::try_from(frames) {
                    // A subscriber too slow or gone: ZMQ's PUB drops for it, as libzmq does.
                    if let Err(e) = publish.send(message).await {
                        tracing::warn!(error = %e, "KV event batch not published");
                    }
                }
                seq += 1;
            }
        }))
    }
}

/// Answers replay requests: `[identity, empty, start_seq]` gets every buffered batch from
/// `start_seq` on, then the end marker.
async fn serve_replays(mut router: zeromq::RouterSocket, buffer: Buffer, topic: Bytes) {
    const END: [u8; 8] = (-1i64).to_be_bytes();
    loop {
        let request = match router.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                tracing::warn!(error = %e, "KV events replay socket stopped");
                return;
            }
        };
        let (Some(identity), Some(start)) = (request.first(), request.last()) else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(&start[..]).map(u64::from_be_bytes) else {
            tracing::debug!("a KV events replay request without an 8-byte start");
            continue;
        };
        let wanted: Vec<(u64, Bytes)> = match buffer.lock() {
            Ok(kept) => kept.iter().filter(|(s, _)| *s >= start).cloned().collect(),
            Err(_) => Vec::new(),
        };
        let empty = Bytes::new();
        for (seq, payload) in wanted {
            let frames = vec![
                identity.clone(),
                empty.clone(),
                topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload,
            ];
            if let Ok(m) = ZmqMessage::try_from(frames) {
                if router.send(m).await.is_err() {
                    break;
                }
            }
        }
        let end = vec![
            identity.clone(),
            empty.clone(),
            empty.clone(),
            Bytes::copy_from_slice(&END),
            empty,
        ];
        if let Ok(m) = ZmqMessage::try_from(end) {
            let _ = router.send(m).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn ranks_publish_on_consecutive_ports() {
        let s = source_for_rank("tcp://*:5557", Some("tcp://*:6000"), "kv", 2).unwrap();
        assert_eq!(s.endpoint, "tcp://*:5559");
        assert_eq!(s.replay_endpoint.as_deref(), Some("tcp://*:6002"));
        for bad in ["ipc:///tmp/x", "tcp://:5557", "tcp://*", "tcp://*:65535x"] {
            assert!(source_for_rank(bad, None, "", 0).is_err(), "{bad}");
        }
        assert!(
            source_for_rank("tcp://*:65535", None, "", 1).is_err(),
            "past the last port"
        );
        assert_eq!(bind_address("tcp://*:5557"), "tcp://0.0.0.0:5557");
    }

    /// The bytes of a batch, decoded by hand from msgpack's markers.
    #[test]
    fn a_batch_is_vllms_array_of_ts_tagged_events_and_rank() {
        let mut hash = [0u8; 32];
        hash[31] = 5;
        let mut parent = [0u8; 32];
        parent[24] = 0x80; // >= 2^63: a uint64
        let batch = KvEventBatch {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(2),
            events: vec![
                KvEvent::Stored {
                    hashes: vec![hash],
                    parent: Some(parent),
                    token_ids: vec![1, 300],
                },
                KvEvent::Removed { hashes: vec![hash] },
            ],
        };
        let bytes = encode(&batch, 1, 2, "CPU");
        let mut want = vec![0x93, 0xcb];
        want.extend(2.0f64.to_be_bytes());
        want.push(0x92);
        want.push(0x88);
        let s = |w: &mut Vec<u8>, text: &str| {
            w.push(0xa0 | text.len() as u8);
            w.extend(text.as_bytes());
        };
        s(&mut want, "type");
        s(&mut want, "BlockStored");
        s(&mut want, "block_hashes");
        want.extend([0x91, 0x05]);
        s(&mut want, "parent_block_hash");
        want.push(0xcf);
        want.extend(0x8000_0000_0000_0000u64.to_be_bytes());
        s(&mut want, "token_ids");
        want.extend([0x92, 0x01, 0xcd, 0x01, 0x2c]);
        s(&mut want, "block_size");
        want.push(0x02);
        s(&mut want, "lora_id");
        want.push(0xc0);
        s(&mut want, "medium");
        s(&mut want, "CPU");
        s(&mut want, "lora_name");
        want.push(0xc0);
        want.push(0x83);
        s(&mut want, "type");
        s(&mut want, "BlockRemoved");
        s(&mut want, "block_hashes");
        want.extend([0x91, 0x05]);
        s(&mut want, "medium");
        s(&mut want, "CPU");
        want.push(0x01);
        assert_eq!(bytes, want);
    }
}
