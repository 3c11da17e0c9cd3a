//! How an event becomes an HTTP request: the URL from its template, the body and headers of
//! the CloudEvents HTTP binding (structured: the envelope as `application/cloudevents+json`;
//! binary: the payload as it is, its attributes as `ce-` headers), `Idempotency-Key`, and
//! the Standard Webhooks signature. Also how an answer's `Retry-After` is read.
//!
//! Invariants:
//! - Header values are percent-encoded as the CloudEvents HTTP binding asks (space, `"`,
//!   `%` and everything outside printable ASCII), so any outbox text becomes a valid header
//!   and decodes back to itself.
//! - The signature covers exactly the bytes sent, with the `webhook-id` and
//!   `webhook-timestamp` values as sent; it is made at send time, so a retried request
//!   carries a fresh timestamp.

use crate::format::{self, Format};
use crate::routing::Template;
use crate::{Event, Payload};
use base64::Engine;
use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use ring::hmac;
use std::time::{Duration, SystemTime};

/// How events are laid out in requests: the two modes of the CloudEvents HTTP binding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The envelope as the body (`application/cloudevents+json`).
    #[default]
    Structured,
    /// The payload as the body, the attributes as `ce-` headers.
    Binary,
}

/// The content type of a structured-mode body.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// One event as a request, ready to sign and send.
#[derive(Debug, Clone)]
pub struct Request {
    pub url: hyper::Uri,
    /// The URL without user information, for messages.
    pub shown_url: String,
    /// The event id as a header value (`Idempotency-Key`, `webhook-id`).
    pub id: HeaderValue,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// Percent-encodes what an HTTP header value may not carry as it is, as the CloudEvents
/// HTTP binding does for attribute values.
pub fn header_value(value: &str) -> HeaderValue {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (0x21..=0x7E).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("percent-encoded text is a valid header value")
}

/// The URL `template` renders for `event`, checked: an `http` or `https` URL.
pub fn render_url(template: &Template, event: &Event) -> Result<(hyper::Uri, String), String> {
    let mut text = String::new();
    template.render(event, &mut text);
    let parsed = url::Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            "the url template renders an invalid http(s) URL for this event: fix sinks.NAME.url \
             or the event's fields it uses"
                .to_owned()
        })?;
    let mut shown = parsed.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    let uri = parsed
        .as_str()
        .parse::<hyper::Uri>()
        .map_err(|err| format!("the url template renders a URL hyper refuses: {err}"))?;
    Ok((uri, shown.to_string()))
}

/// The request for `event`, or why no endpoint could take it.
pub fn build(event: &Event, url: &Template, mode: Mode) -> Result<Request, String> {
    let (url, shown_url) = render_url(url, event)?;
    let mut headers = Vec::new();
    let body = match mode {
        Mode::Structured => {
            let mut line = Vec::with_capacity(event.payload.len() + 512);
            format::write_line(Format::CloudEvents, event, &mut line);
            line.pop();
            headers.push((
                CONTENT_TYPE,
                HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
            ));
            Bytes::from(line)
        }
        Mode::Binary => {
            let body = match &event.payload {
                Payload::Tombstone => {
                    return Err("the event has no payload (a tombstone: on_null_payload = \
                         \"tombstone\"), and only a Kafka sink can carry one: route the table \
                         only to Kafka sinks"
                        .into())
                }
                Payload::Json(json) => Bytes::copy_from_slice(json.as_bytes()),
                Payload::Binary { bytes, .. } => bytes.clone(),
            };
            headers.push((CONTENT_TYPE, header_value(event.payload.content_type())));
            for (name, value) in format::attributes(event) {
                if name == "datacontenttype" {
                    continue;
                }
                let name = HeaderName::from_bytes(format!("ce-{name}").as_bytes())
                    .expect("attribute names are lower-case letters and digits");
                headers.push((name, header_value(&value.to_string())));
            }
            body
        }
    };
    Ok(Request {
        url,
        shown_url,
        id: header_value(&event.id),
        headers,
        body,
    })
}

/// A Standard Webhooks signing key: the bytes after `whsec_` decoded from base64, or the
/// secret's own bytes when it has no such prefix.
pub fn signing_key(secret: &str) -> Result<hmac::Key, String> {
    let bytes = match secret.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| "the secret starts with whsec_ but the rest is not base64".to_owned())?,
        None => secret.as_bytes().to_vec(),
    };
    if bytes.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

/// The Standard Webhooks headers for a request with `id` and `body` sent at `now`:
/// `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`
/// (`v1,` + base64 of HMAC-SHA256 over `id.timestamp.body`).
pub fn signature_headers(
    key: &hmac::Key,
    id: &HeaderValue,
    body: &[u8],
    now: SystemTime,
) -> [(HeaderName, HeaderValue); 3] {
    let timestamp = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string();
    let mut context = hmac::Context::with_key(key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.as_bytes());
    context.update(b".");
    context.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(context.sign().as_ref());
    [
        (HeaderName::from_static("webhook-id"), id.clone()),
        (
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from_str(&timestamp).expect("digits"),
        ),
        (
            HeaderName::from_static("webhook-signature"),
            HeaderValue::from_str(&format!("v1,{signature}")).expect("base64"),
        ),
    ]
}

/// The wait a `Retry-After` value asks for: seconds, or an HTTP date (0 when past).
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;
    use crate::Text;

    fn template(text: &str) -> Template {
        Template::parse(text).unwrap()
    }

    fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
        request
            .headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap())
    }

    #[test]
    fn structured_mode_sends_the_envelope() {
        let event = sample(0x16B3748, 2);
        let url = template("https://user:pw@hooks.example.com/{aggregatetype}?token=x");
        let request = build(&event, &url, Mode::Structured).unwrap();
        assert_eq!(
            request.url.to_string(),
            "https://user:pw@hooks.example.com/order?token=x"
        );
        assert_eq!(request.shown_url, "https://hooks.example.com/order");
        assert_eq!(
            header(&request, "content-type"),
            Some(STRUCTURED_CONTENT_TYPE)
        );
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["id"], event.id.as_str());
        assert_eq!(body["data"]["total"], 12);
        assert_eq!(request.id.to_str().unwrap(), event.id.as_str());
    }

    #[test]
    fn binary_mode_sends_the_payload_and_attributes_as_ce_headers() {
        let mut event = sample(0x16B3748, 2);
        event.headers = vec![("X-Tenant".into(), Text::from("acme corp"))];
        let request = build(&event, &template("http://h/x"), Mode::Binary).unwrap();
        assert_eq!(&request.body[..], br#"{"total": 12}"#);
        assert_eq!(header(&request, "content-type"), Some("application/json"));
        assert_eq!(header(&request, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&request, "ce-id"), Some(event.id.as_str()));
        assert_eq!(header(&request, "ce-subject"), Some("order-%221%22"));
        assert_eq!(
            header(&request, "ce-sequence"),
            Some("00000000016B374800000002")
        );
        assert_eq!(header(&request, "ce-xtenant"), Some("acme%20corp"));
        assert_eq!(header(&request, "ce-datacontenttype"), None);
        event.payload = Payload::Tombstone;
        assert!(build(&event, &template("http://h/x"), Mode::Binary).is_err());
    }

    #[test]
    fn header_values_are_percent_encoded_and_any_text_fits() {
        assert_eq!(header_value("plain-id_1").to_str().unwrap(), "plain-id_1");
        assert_eq!(header_value("a b\"%\n").to_str().unwrap(), "a%20b%22%25%0A");
        assert_eq!(header_value("é").to_str().unwrap(), "%C3%A9");
    }

    #[test]
    fn a_url_that_is_not_http_is_refused_for_the_event() {
        let event = sample(1, 0);
        for bad in ["ftp://h/x", "{aggregatetype}", "http://"] {
            assert!(
                build(&event, &template(bad), Mode::Structured).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let id = HeaderValue::from_static("msg_p5jXN8AQM9LWM0D4loKWxJek");
        let body = br#"{"test": 2432232314}"#;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1614265330);
        let [(_, sent_id), (_, timestamp), (_, signature)] =
            signature_headers(&key, &id, body, now);
        assert_eq!(sent_id, id);
        assert_eq!(timestamp, "1614265330");
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(signing_key("whsec_***").is_err());
        assert!(signing_key("").is_err());
        assert!(signing_key("plain secret").is_ok());
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784111777);
        let value = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(retry_after(&value("7"), now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(&value("Sun, 06 Nov 1994 08:49:47 GMT"), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&value("Sun, 06 Nov 1994 08:49:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&value("soon"), now), None);
    }
}
