//! HTTP client for agent-to-agent calls (and the `ferry` CLI).

use crate::AgentError;
use serde_json::Value;
use std::time::Duration;

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        .build()
        .into()
}

fn base(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}

fn finish(
    what: &str,
    r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Value, AgentError> {
    let mut resp = r.map_err(|e| AgentError::Unavailable(format!("{what}: {e}")))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if status < 300 {
        return Ok(body);
    }
    let msg = body
        .get("error")
        .and_then(|e| e.as_str())
        .map(String::from)
        .unwrap_or(text);
    Err(match status {
        400 | 422 => AgentError::BadRequest(msg),
        404 => AgentError::NotFound(msg),
        409 => AgentError::Conflict(msg),
        503 => AgentError::Unavailable(msg),
        _ => AgentError::Internal(format!("{what}: HTTP {status}: {msg}")),
    })
}

/// GET `path` from the agent at `addr`.
pub fn get(addr: &str, path: &str) -> Result<Value, AgentError> {
    let url = format!("{}{path}", base(addr));
    finish(&url, agent(Some(Duration::from_secs(30))).get(&url).call())
}

/// POST JSON to `path`. `timeout` None: wait as long as the operation takes (drains).
pub fn post(
    addr: &str,
    path: &str,
    body: &Value,
    timeout: Option<Duration>,
) -> Result<Value, AgentError> {
    let url = format!("{}{path}", base(addr));
    finish(&url, agent(timeout).post(&url).send_json(body))
}

/// DELETE `path`.
pub fn delete(addr: &str, path: &str) -> Result<Value, AgentError> {
    let url = format!("{}{path}", base(addr));
    finish(
        &url,
        agent(Some(Duration::from_secs(60))).delete(&url).call(),
    )
}

/// Follows a server-sent event stream, calling `on_event` with each `data:` JSON until it
/// returns false or the stream ends.
pub fn follow_events(
    addr: &str,
    path: &str,
    mut on_event: impl FnMut(&Value) -> bool,
) -> Result<(), AgentError> {
    use std::io::BufRead;
    let url = format!("{}{path}", base(addr));
    let resp = agent(None)
        .get(&url)
        .call()
        .map_err(|e| AgentError::Unavailable(format!("{url}: {e}")))?;
    if resp.status().as_u16() >= 300 {
        return finish(&url, Ok(resp)).map(|_| ());
    }
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    for line in reader.lines() {
        let line = line.map_err(|e| AgentError::Unavailable(format!("{url}: {e}")))?;
        if let Some(data) = line.strip_prefix("data:") {
            if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                if !on_event(&v) {
                    break;
                }
            }
        }
    }
    Ok(())
}
