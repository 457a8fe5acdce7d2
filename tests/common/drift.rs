//! How far a cheaper configuration (quantized weights, a half-precision KV cache) moves the
//! log-probabilities of the goldens' continuations from the f32 model's, teacher-forced.

use candle_core::{DType, D};
use distillery::model::Decoder;

/// Log-softmax rows for every position of `ids`, one sequence in one forward, with a KV
/// cache storing `kv`.
pub fn logprobs(decoder: &Decoder, ids: &[u32], kv: DType) -> Vec<Vec<f32>> {
    let logits = super::forward_one_cached_as(decoder, ids, true, kv);
    candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The top entry of `row` and its lead over the second.
pub fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0, best.1 - second)
}

#[derive(Default, Debug)]
pub struct Drift {
    pub positions: usize,
    pub sum: f64,
    pub max: f32,
    pub greedy_checked: usize,
    pub greedy_differs: usize,
}

impl Drift {
    pub fn mean(&self) -> f32 {
        (self.sum / self.positions.max(1) as f64) as f32
    }
}

/// Every golden prompt of `name`: `|Δ log p|` of the golden next token between `reference`
/// and `got` (each a log-softmax row per position of its input), and whether the greedy
/// choice moved where the reference's top two are more than `tie` apart.
pub fn measure(
    name: &str,
    reference: impl Fn(&[u32]) -> Vec<Vec<f32>>,
    got: impl Fn(&[u32]) -> Vec<Vec<f32>>,
    tie: f32,
) -> Drift {
    let mut d = Drift::default();
    for case in super::golden(name).expect("golden.json").cases {
        let ids: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.generated_ids)
            .copied()
            .collect();
        let (want_rows, got_rows) = (reference(&ids), got(&ids));
        // Row i predicts ids[i + 1]: score the prompt's last position and the continuation.
        for i in case.prompt_ids.len() - 1..ids.len() - 1 {
            let next = ids[i + 1] as usize;
            let delta = (got_rows[i][next] - want_rows[i][next]).abs();
            d.positions += 1;
            d.sum += delta as f64;
            d.max = d.max.max(delta);
            let (want, gap) = argmax(&want_rows[i]);
            if gap > tie {
                d.greedy_checked += 1;
                d.greedy_differs += usize::from(argmax(&got_rows[i]).0 != want);
            }
        }
    }
    d
}
