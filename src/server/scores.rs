//! Logprobs in the three shapes responses give them: completions' (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`), chat's (`logprobs.content`) and vLLM's
//! `prompt_logprobs`. Takes the output layer's [`TokenLogprob`]s; knows nothing of requests.

use super::output::TokenLogprob;
use super::protocol::{
    ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, PromptLogprobEntry, PromptLogprobMap,
    PromptLogprobs, TopLogprobMap,
};

/// Generated or echoed tokens in completions' shape. `base` is the characters of the
/// choice's text before the first of them (the echoed prompt, for generated tokens). The
/// top logprobs hold the `k` best and the token itself where it is not among them (OpenAI:
/// up to `logprobs + 1`).
pub fn completion_logprobs(entries: &[TokenLogprob], k: usize, base: usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    for e in entries {
        lp.tokens.push(e.token.text.clone());
        lp.token_logprobs.push(e.logprob);
        lp.top_logprobs.push(e.logprob.map(|own| {
            let mut top: Vec<(String, f32)> = e
                .top
                .iter()
                .take(k)
                .map(|(t, l)| (t.text.clone(), *l))
                .collect();
            if !e.top.iter().take(k).any(|(t, _)| t.id == e.token.id) {
                let at = top.partition_point(|&(_, l)| l >= own);
                top.insert(at, (e.token.text.clone(), own));
            }
            TopLogprobMap::from_ordered(top)
        }));
        lp.text_offset.push(base + e.offset);
    }
    lp
}

/// vLLM's `prompt_logprobs` for one prompt: each position's own token and the top `k`.
pub fn vllm_prompt_logprobs(tokens: &[TokenLogprob], k: usize) -> PromptLogprobs {
    tokens
        .iter()
        .map(|e| {
            let own = e.logprob?;
            let mut map: Vec<(u32, PromptLogprobEntry)> = vec![(
                e.token.id,
                PromptLogprobEntry {
                    logprob: own,
                    rank: e.rank.unwrap_or(1),
                    decoded_token: e.token.text.clone(),
                },
            )];
            for (rank, (t, l)) in e.top.iter().take(k).enumerate() {
                if t.id != e.token.id {
                    map.push((
                        t.id,
                        PromptLogprobEntry {
                            logprob: *l,
                            rank: rank as u32 + 1,
                            decoded_token: t.text.clone(),
                        },
                    ));
                }
            }
            Some(PromptLogprobMap(map))
        })
        .collect()
}

/// Chat's `logprobs.content`: each token's text, logprob, own bytes and top entries.
pub fn chat_logprobs(entries: &[TokenLogprob]) -> Vec<ChatTokenLogprob> {
    entries
        .iter()
        .map(|e| ChatTokenLogprob {
            token: e.token.text.clone(),
            logprob: e.logprob.unwrap_or(f32::NEG_INFINITY),
            bytes: e.token.bytes.clone(),
            top_logprobs: e
                .top
                .iter()
                .map(|(t, l)| ChatTopLogprob {
                    token: t.text.clone(),
                    logprob: *l,
                    bytes: t.bytes.clone(),
                })
                .collect(),
        })
        .collect()
}
