//! Text <-> token ids for one model: a wrapper around the `tokenizers` crate, the
//! model's chat template (rendered the way transformers' `apply_chat_template` does),
//! and an incremental detokenizer for streaming.
//!
//! This module must not know about tensors, HTTP or scheduling: it takes strings,
//! messages and ids, and gives back strings and ids.

mod byte_decoder;
mod chat_template;
mod detokenizer;
mod python_format;
mod segment_cache;
pub mod stop_strings;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detokenizer::IncrementalDetokenizer;
pub use stop_strings::{StopOutcome, StopStrings};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

#[derive(thiserror::Error, Debug)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load tokenizer.json: {0}")]
    Load(#[source] tokenizers::Error),
    #[error("invalid tokenizer_config.json: {0}")]
    Config(String),
    #[error("encoding failed: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("decoding failed: {0}")]
    Decode(#[source] tokenizers::Error),
    #[error("the tokenizer has no chat template")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
    #[error(
        "continue_final_message is set but the final message does not appear in the chat \
         after applying the chat template"
    )]
    FinalMessageNotRendered,
}

/// How a chat is rendered, beyond its messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenderArgs<'a> {
    pub add_generation_prompt: bool,
    /// End the text inside the last message, for the model to continue it (transformers'
    /// `continue_final_message`).
    pub continue_final_message: bool,
    pub tools: Option<&'a Json>,
    /// More variables for the template (`chat_template_kwargs`).
    pub extra: Option<&'a serde_json::Map<String, Json>>,
}

/// One model's tokenizer. `Send + Sync`; share it in an `Arc`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_id: Option<u32>,
    add_bos_token: Option<bool>,
    chat_template: Option<ChatTemplate>,
    segments: Option<segment_cache::SegmentCache>,
    bytes: Option<byte_decoder::ByteDecoder>,
    /// `tokenizer_config.json` as read (`null` without one), for `/tokenizer_info`.
    config: Json,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` (optional) and
    /// `chat_template.jinja` (optional; newer transformers save the template there
    /// and prefer it over the config's).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_json = read(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = config_path
            .is_file()
            .then(|| read(&config_path))
            .transpose()?;
        let template_path = dir.join("chat_template.jinja");
        let template = template_path
            .is_file()
            .then(|| read(&template_path))
            .transpose()?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        Self::build(&tokenizer_json, config.as_deref(), template)
    }

    /// For a model embedded in the binary: the two files' contents.
    pub fn from_parts(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
    ) -> Result<Self, TokenizerError> {
        Self::build(tokenizer_json, tokenizer_config_json, None)
    }

    fn build(
        tokenizer_json: &[u8],
        config_json: Option<&[u8]>,
        template_override: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let mut inner =
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(TokenizerError::Load)?;
        // Some tokenizer.json files carry training-time truncation/padding, which
        // would silently cut or pad a server's prompts.
        inner.with_truncation(None).map_err(TokenizerError::Load)?;
        inner.with_padding(None);

        let config: Json = match config_json {
            Some(bytes) => {
                serde_json::from_slice(bytes).map_err(|e| TokenizerError::Config(e.to_string()))?
            }
            None => Json::Null,
        };
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");
        let add_bos_token = config.get("add_bos_token").and_then(Json::as_bool);
        let source = match template_override {
            Some(source) => Some(source),
            None => template_source(&config)?,
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(&s, bos_token.clone(), eos_token.clone()))
            .transpose()?;
        let eos_token_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let segments = segment_cache::SegmentCache::new(&inner);
        let bytes = byte_decoder::ByteDecoder::new(&inner);
        Ok(Self {
            config,
            segments,
            bytes,
            inner,
            bos_token,
            eos_token,
            eos_token_id,
            add_bos_token,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.segments {
            // The post-processor's additions (a BOS) belong to the whole text, not to pieces.
            Some(cache) if !add_special_tokens => {
                cache.encode(text, |piece| self.encode_whole(piece, false))
            }
            _ => self.encode_whole(text, add_special_tokens),
        }
    }

    /// Whether prompts are encoded turn by turn with their leading turns reused (see
    /// `segment_cache`): false where the tokenizer has no special token to split at, or
    /// where it was found to encode a split prompt differently.
    pub fn reuses_prompt_prefixes(&self) -> bool {
        self.segments.as_ref().is_some_and(|c| c.is_on())
    }

    fn encode_whole(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        // encode_fast skips offset tracking, which a server never uses.
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(table) = &self.bytes {
            let check = || self.decode_slow(ids, skip_special_tokens).ok();
            if let Some(text) = table.decode(ids, skip_special_tokens, check) {
                return Ok(text);
            }
        }
        self.decode_slow(ids, skip_special_tokens)
    }

    fn decode_slow(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    /// One token's own bytes, as OpenAI's `logprobs.content[].bytes` gives them: for a
    /// token that ends inside a UTF-8 character, the bytes it holds, not U+FFFD's.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(b) = self.bytes.as_ref().and_then(|t| t.token_bytes(id)) {
            return b.to_vec();
        }
        // SentencePiece's byte fallback spells a lone byte `<0xAB>`.
        if let Some(byte) = self
            .id_to_token(id)
            .as_deref()
            .and_then(|t| t.strip_prefix("<0x")?.strip_suffix('>').map(str::to_owned))
            .and_then(|hex| (hex.len() == 2).then(|| u8::from_str_radix(&hex, 16).ok())?)
        {
            return vec![byte];
        }
        self.decode(&[id], false).unwrap_or_default().into_bytes()
    }

    /// Whether ids are decoded from a byte table rather than by `tokenizers` (see
    /// `byte_decoder`): true for byte-level BPE tokenizers until a check finds a difference.
    pub fn decodes_from_byte_table(&self) -> bool {
        self.bytes.as_ref().is_some_and(|t| t.is_on())
    }

    /// Whether `text` is one added token of the vocabulary (a chat or tool-call marker).
    pub fn is_added_token(&self, text: &str) -> bool {
        self.inner
            .get_added_vocabulary()
            .get_vocab()
            .contains_key(text)
    }

    /// The tokenizer as `tokenizer.json` text (what a grammar engine builds its token table
    /// from).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(false).map_err(TokenizerError::Load)
    }

    /// Number of distinct tokens, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// `tokenizer_config.json` as read (`null` when the model has none).
    pub fn config(&self) -> &Json {
        &self.config
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// `add_bos_token` from tokenizer_config.json. Informational: whether BOS is
    /// added is decided by tokenizer.json's post-processor, which `encode` applies.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.apply_chat_template_with_tools(messages, add_generation_prompt, None)
    }

    /// [`Self::apply_chat_template`] with the request's `tools` for the template to list.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&Json>,
    ) -> Result<String, TokenizerError> {
        self.chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?
            .render_serialized(messages, add_generation_prompt, tools)
    }

    /// Renders `messages` as `args` says. With `continue_final_message` the text is cut just
    /// after the last message's content (as transformers cuts it), so the model goes on.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        args: RenderArgs<'_>,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let mut text =
            template.render_with(messages, args.add_generation_prompt, args.tools, args.extra)?;
        if args.continue_final_message {
            let last = messages.last().map_or("", |m| m.text());
            let at = text
                .rfind(last.trim())
                .ok_or(TokenizerError::FinalMessageNotRendered)?;
            let kept = last.trim_start();
            let end = if text[at..].starts_with(kept) {
                at + kept.len()
            } else {
                at + last.trim().len()
            };
            text.truncate(end);
        }
        Ok(text)
    }

    /// A streaming detokenizer for one generated sequence.
    pub fn detokenizer(self: &Arc<Self>, skip_special_tokens: bool) -> IncrementalDetokenizer {
        IncrementalDetokenizer::new(Arc::clone(self), skip_special_tokens)
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// transformers writes special tokens either as a plain string or as an
/// AddedToken object `{"content": ..., ...}`.
fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or (older multi-template configs) a list of
/// `{"name", "template"}` of which transformers uses "default".
fn template_source(config: &Json) -> Result<Option<String>, TokenizerError> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_owned)),
        Some(_) => Err(TokenizerError::Config(
            "chat_template is neither a string nor a list of named templates".into(),
        )),
    }
}
