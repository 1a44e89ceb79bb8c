//! The OpenAI completions protocol: request parsing and validation, response bodies and
//! errors. Pure data, no PostgreSQL: the HTTP thread uses it.

use serde_json::{json, Map, Value};

/// A validated `POST /v1/completions` request.
#[derive(Clone, Debug)]
pub struct Completion {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Not in OpenAI's API; 0 = off (as pg_llm's SQL functions).
    pub top_k: i64,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub echo: bool,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// An error answered to the client: HTTP status, OpenAI's error `type`, a message, and a code
/// (the SQLSTATE when the database raised it).
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub code: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            code: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: 401,
            kind: "invalid_request_error",
            message: message.into(),
            code: Some("invalid_api_key".into()),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            kind: "server_error",
            message: message.into(),
            code: None,
        }
    }

    /// An error raised with `sqlstate`, mapped to the HTTP status a client expects.
    pub fn from_sqlstate(sqlstate: &str, message: impl Into<String>) -> Self {
        let (status, kind) = match sqlstate {
            "42704" => (404, "invalid_request_error"),
            "42501" => (403, "permission_error"),
            s if s.starts_with("22") || s.starts_with("54") || s == "53200" => {
                (400, "invalid_request_error")
            }
            "57014" | "57P01" | "55000" => (503, "server_error"),
            _ => (500, "server_error"),
        };
        Self {
            status,
            kind,
            message: message.into(),
            code: Some(sqlstate.to_string()),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": Value::Null,
            "code": self.code,
        }})
    }
}

/// Most stop sequences a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;

/// Parses and validates a request body. Fields of OpenAI's API that pg_llm does not implement
/// are refused when set to anything but their neutral value, rather than silently ignored.
pub fn parse_completion(body: &[u8]) -> Result<Completion, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "'model' is required and must be a string",
            ))
        }
    };
    let prompt = parse_prompt(obj.get("prompt"))?;
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => 16,
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => n as usize,
            _ => {
                return Err(ApiError::bad_request(
                    "'max_tokens' must be a non-negative integer",
                ))
            }
        },
    };
    let number =
        |name: &str, default: f64, ok: &dyn Fn(f64) -> bool, rule: &str| match obj.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && ok(x) => Ok(x),
                _ => Err(ApiError::bad_request(format!("'{name}' must be {rule}"))),
            },
        };
    let temperature = number(
        "temperature",
        1.0,
        &|x| (0.0..=2.0).contains(&x),
        "between 0 and 2",
    )?;
    let top_p = number("top_p", 1.0, &|x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    let top_k = number(
        "top_k",
        0.0,
        &|x| x >= 0.0 && x.fract() == 0.0,
        "a non-negative integer",
    )?;
    for (name, neutral) in [("presence_penalty", 0.0), ("frequency_penalty", 0.0)] {
        number(
            name,
            neutral,
            &|x| x == neutral,
            "0 (penalties are not supported)",
        )?;
    }
    for (name, neutral) in [("n", 1.0), ("best_of", 1.0)] {
        number(
            name,
            neutral,
            &|x| x == neutral,
            "1 (one completion per request)",
        )?;
    }
    let unsupported = |name: &str, neutral: &dyn Fn(&Value) -> bool| match obj.get(name) {
        Some(v) if !neutral(v) => Err(ApiError::bad_request(format!(
            "'{name}' is not supported by pg_llm"
        ))),
        _ => Ok(()),
    };
    unsupported("logprobs", &|v| v.is_null())?;
    unsupported("suffix", &|v| v.is_null())?;
    unsupported("logit_bias", &|v| {
        v.is_null() || v.as_object().is_some_and(Map::is_empty)
    })?;
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::bad_request("'seed' must be an integer"))?,
        ),
    };
    let flag = |name: &str| match obj.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        _ => Err(ApiError::bad_request(format!("'{name}' must be a boolean"))),
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad_request("'stop' must be a string or an array of strings")
            })?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'stop' must be a string or an array of strings",
            ))
        }
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(format!(
            "'stop' takes at most {MAX_STOP} non-empty strings"
        )));
    }
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => o
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        Some(_) => return Err(ApiError::bad_request("'stream_options' must be an object")),
    };
    Ok(Completion {
        model,
        prompt,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: top_k as i64,
        stop,
        seed,
        echo: flag("echo")?,
        stream: flag("stream")?,
        include_usage,
    })
}

/// A prompt is a string, or token ids; a list of one of either is accepted too (OpenAI's
/// batch form), but one completion is served per request.
fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let tokens = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
            })
            .collect()
    };
    match v {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(ApiError::bad_request("'prompt' is empty"))
        }
        Some(Value::Array(items)) if items[0].is_number() => {
            tokens(items).map(Prompt::Tokens).ok_or_else(|| {
                ApiError::bad_request("'prompt' token ids must be non-negative integers")
            })
        }
        Some(Value::Array(items)) if items.len() == 1 => parse_prompt(items.first()),
        Some(Value::Array(_)) => Err(ApiError::bad_request(
            "'prompt' holds several prompts; send one per request",
        )),
        None | Some(Value::Null) => Err(ApiError::bad_request("'prompt' is required")),
        Some(_) => Err(ApiError::bad_request(
            "'prompt' must be a string or an array of token ids",
        )),
    }
}

/// What every body of one completion repeats: its id, creation time and model.
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// Tokens in and out of a completion.
#[derive(Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Envelope {
    fn body(&self, choices: Value, usage: Option<Usage>) -> Value {
        let mut body = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = json!({
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            });
        }
        body
    }

    fn choice(text: &str, finish_reason: Option<&str>) -> Value {
        json!([{"text": text, "index": 0, "logprobs": Value::Null, "finish_reason": finish_reason}])
    }

    /// The body of a finished completion.
    pub fn completion(&self, text: &str, finish_reason: &str, usage: Usage) -> Value {
        self.body(Self::choice(text, Some(finish_reason)), Some(usage))
    }

    /// One server-sent event of a streamed completion.
    pub fn chunk(&self, text: &str, finish_reason: Option<&str>) -> Value {
        self.body(Self::choice(text, finish_reason), None)
    }

    /// The last event of a stream with `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.body(json!([]), Some(usage))
    }
}

/// `GET /v1/models`: (name, owner role) of each model.
pub fn models_body(models: &[(String, String)]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    json!({"object": "list", "data": data})
}
