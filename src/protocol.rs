//! The EmailEngine authentication-server contract: what a request looks like, who may make
//! it, and the exact answer bodies EmailEngine accepts.
//!
//! Everything here is pure and allocation-light, because it runs on every IMAP/SMTP
//! connection and every Gmail/Graph API call EmailEngine makes. The rules follow
//! EmailEngine's code (see `shared/docs/emailengine-auth-protocol.md`).

use base64::Engine;
use bytes::Bytes;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// The protocol EmailEngine is authenticating, from the `proto` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// An IMAP connection.
    Imap,
    /// An SMTP submission.
    Smtp,
    /// A Gmail API or MS Graph API request.
    Api,
}

impl Proto {
    /// All protocols, in a fixed order (used for per-protocol tables).
    pub const ALL: [Proto; 3] = [Proto::Imap, Proto::Smtp, Proto::Api];

    /// The wire name, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Imap => "imap",
            Proto::Smtp => "smtp",
            Proto::Api => "api",
        }
    }

    /// Parses the wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "imap" => Some(Proto::Imap),
            "smtp" => Some(Proto::Smtp),
            "api" => Some(Proto::Api),
            _ => None,
        }
    }
}

/// What a token request asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenQuery<'a> {
    /// The EmailEngine account id (borrowed from the query unless it had to be decoded).
    pub account: std::borrow::Cow<'a, str>,
    /// The protocol; `None` when EmailEngine (older versions) sent no `proto`: "any protocol".
    pub proto: Option<Proto>,
}

/// Why a query string was refused (answered with 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    /// No `account` parameter.
    #[error("missing query parameter `account`")]
    MissingAccount,
    /// `account=` with nothing after it.
    #[error("query parameter `account` is empty")]
    EmptyAccount,
    /// A parameter we read appears twice: which one wins would be a guess.
    #[error("query parameter `{0}` is given more than once")]
    Duplicate(&'static str),
    /// `proto` is not one of imap, smtp, api.
    #[error("unknown `proto` value (expected imap, smtp or api)")]
    UnknownProto,
    /// Percent-encoding that does not decode to UTF-8.
    #[error("query parameter `{0}` is not valid percent-encoded UTF-8")]
    InvalidEncoding(&'static str),
}

/// Parses `account` and `proto` from a query string, as EmailEngine form-encodes them
/// (`+` is a space). Other parameters are ignored: the configured URL may carry its own.
pub fn parse_query(query: Option<&str>) -> Result<TokenQuery<'_>, QueryError> {
    let mut account: Option<std::borrow::Cow<'_, str>> = None;
    let mut proto: Option<Option<Proto>> = None;
    for pair in query.unwrap_or("").split('&') {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        match raw_name {
            "account" => {
                if account.is_some() {
                    return Err(QueryError::Duplicate("account"));
                }
                account = Some(decode_component(raw_value, "account")?);
            }
            "proto" => {
                if proto.is_some() {
                    return Err(QueryError::Duplicate("proto"));
                }
                let value = decode_component(raw_value, "proto")?;
                proto = Some(if value.is_empty() {
                    None
                } else {
                    Some(Proto::parse(&value).ok_or(QueryError::UnknownProto)?)
                });
            }
            _ => {}
        }
    }
    let account = account.ok_or(QueryError::MissingAccount)?;
    if account.is_empty() {
        return Err(QueryError::EmptyAccount);
    }
    Ok(TokenQuery {
        account,
        proto: proto.flatten(),
    })
}

/// Decodes one form-encoded value strictly: invalid UTF-8 is an error, not a U+FFFD.
/// Borrows when there is nothing to decode (the usual account id).
fn decode_component<'a>(
    raw: &'a str,
    name: &'static str,
) -> Result<std::borrow::Cow<'a, str>, QueryError> {
    if !raw.contains(['%', '+']) {
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    let plus_decoded = raw.replace('+', " ");
    percent_decode_strict(&plus_decoded, name).map(|c| std::borrow::Cow::Owned(c.into_owned()))
}

/// Percent-decodes `raw` strictly: a `%` not followed by two hex digits (`%zz`, a
/// trailing `%`) or bytes that are not UTF-8 are an error, never passed through.
pub fn percent_decode_strict<'a>(
    raw: &'a str,
    name: &'static str,
) -> Result<std::borrow::Cow<'a, str>, QueryError> {
    let bytes = raw.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err(QueryError::InvalidEncoding(name));
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| QueryError::InvalidEncoding(name))
}

/// Basic credentials the sidecar accepts, compared byte for byte in constant time.
///
/// EmailEngine takes the user and password from the `authServer` URL without
/// percent-decoding them, so the expected bytes are exactly what the operator typed
/// into that URL (for example the literal `p%40ss`). More than one pair may be accepted
/// at once, so credentials can be rotated without a window where EmailEngine is refused.
#[derive(Clone)]
pub struct BasicCredentials {
    /// Each accepted `user:password`, the decoded form of the header's base64 payload.
    expected: Vec<Vec<u8>>,
    /// Each accepted pair as the exact header EmailEngine sends (`Basic <base64>`): the
    /// hot path compares these without decoding or allocating.
    headers: Vec<Vec<u8>>,
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BasicCredentials({} pair(s), [redacted])",
            self.expected.len()
        )
    }
}

impl BasicCredentials {
    /// Accepts one user and password.
    pub fn new(username: &str, password: &Secret) -> Self {
        let mut expected = Vec::with_capacity(username.len() + 1 + password.expose().len());
        expected.extend_from_slice(username.as_bytes());
        expected.push(b':');
        expected.extend_from_slice(password.expose().as_bytes());
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(&expected)
        )
        .into_bytes();
        BasicCredentials {
            expected: vec![expected],
            headers: vec![header],
        }
    }

    /// Accepts any of several pairs (during a rotation: the old and the new).
    pub fn any_of(pairs: impl IntoIterator<Item = BasicCredentials>) -> Self {
        let (mut expected, mut headers) = (Vec::new(), Vec::new());
        for p in pairs {
            expected.extend(p.expected);
            headers.extend(p.headers);
        }
        BasicCredentials { expected, headers }
    }

    /// Whether an `Authorization` header value carries one of the accepted pairs.
    pub fn matches(&self, header: Option<&[u8]>) -> bool {
        let Some(header) = header else {
            return false;
        };
        // Fast path: the canonical form, compared in constant time against every pair.
        let canonical: bool = self
            .headers
            .iter()
            .fold(subtle::Choice::from(0), |acc, h| acc | header.ct_eq(h))
            .into();
        if canonical {
            return true;
        }
        // Other spellings (`basic`, extra spaces) are decoded and compared the same way.
        let Some(presented) = decode_basic(header) else {
            return false;
        };
        // Every pair is compared (no early exit), each in constant time; ct_eq on slices of
        // different lengths returns false without looking at the content.
        self.expected
            .iter()
            .fold(subtle::Choice::from(0), |acc, e| {
                acc | presented.as_slice().ct_eq(e)
            })
            .into()
    }
}

/// Decodes `Basic <base64>` into its `user:password` bytes; `None` if it is anything else.
pub fn decode_basic(header: &[u8]) -> Option<Vec<u8>> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    decoded.contains(&b':').then_some(decoded)
}

/// Largest `user` EmailEngine accepts (Joi counts UTF-16 code units).
pub const MAX_USER_LEN: usize = 256;
/// Largest `accessToken` EmailEngine accepts.
pub const MAX_ACCESS_TOKEN_LEN: usize = 16_384;
/// Largest `pass` EmailEngine accepts.
pub const MAX_PASS_LEN: usize = 256;

/// Why an answer body would be rejected by EmailEngine's validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    /// `user` is empty or longer than EmailEngine takes.
    #[error("`user` must be 1 to {MAX_USER_LEN} characters")]
    User,
    /// The access token is empty or longer than EmailEngine takes.
    #[error("access token must be 1 to {MAX_ACCESS_TOKEN_LEN} characters")]
    AccessToken,
    /// The access token has a character a bearer token may not contain.
    #[error("access token has characters an OAuth 2.0 bearer token may not contain (RFC 6750: letters, digits, -._~+/ and trailing =)")]
    AccessTokenCharacters,
    /// The password is longer than EmailEngine takes.
    #[error("`pass` must be at most {MAX_PASS_LEN} characters")]
    Pass,
}

fn js_len(s: &str) -> usize {
    s.encode_utf16().count()
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    user: &'a str,
    #[serde(rename = "accessToken")]
    access_token: &'a str,
}

#[derive(Serialize)]
struct PasswordAnswer<'a> {
    user: &'a str,
    pass: &'a str,
}

/// The serialized `{"user","accessToken"}` answer, built once per token and then shared.
pub fn token_answer(user: &str, access_token: &Secret) -> Result<Bytes, AnswerError> {
    Ok(ValidTokenAnswer::new(user, access_token)?.to_bytes(None))
}

/// A `{"user","accessToken"}` answer that passed EmailEngine's limits, not yet
/// serialized: the cache checks it before it takes the token it replaces out of its
/// cell, and serializes it into that token's buffer.
pub struct ValidTokenAnswer<'a> {
    answer: TokenAnswer<'a>,
    /// Its serialized length, measured once: the buffer it goes into is chosen by it.
    len: usize,
}

impl<'a> ValidTokenAnswer<'a> {
    /// Checks `user` and `access_token` against EmailEngine's limits, and the token
    /// against RFC 6750's alphabet: EmailEngine puts it into an `Authorization` header
    /// and an XOAUTH2 string, where a space, quote, CR, LF or NUL breaks the request.
    pub fn new(user: &'a str, access_token: &'a Secret) -> Result<Self, AnswerError> {
        check_user(user)?;
        let token = access_token.expose();
        if token.is_empty() || token.len() > MAX_ACCESS_TOKEN_LEN {
            return Err(AnswerError::AccessToken);
        }
        if !is_b64token(token) {
            return Err(AnswerError::AccessTokenCharacters);
        }
        let answer = TokenAnswer {
            user,
            access_token: access_token.expose(),
        };
        let len = serialized_len(&answer);
        Ok(ValidTokenAnswer { answer, len })
    }

    /// The answer's bytes, written into `previous`'s buffer when nothing else holds it
    /// and it is large enough. With 100k tokens refreshed every few minutes, freeing each
    /// 2 KB answer and allocating its successor elsewhere leaves holes that small
    /// allocations split, until tens of MB of heap are unusable (BENCHMARKS.md, P5);
    /// a refreshed token is nearly always the same length as the one it replaces.
    pub fn to_bytes(&self, previous: Option<Bytes>) -> Bytes {
        let mut buf = match previous.map(Bytes::try_into_mut) {
            Some(Ok(mut buf)) if buf.capacity() >= self.len => {
                buf.clear();
                buf
            }
            _ => answer_buffer(answer_capacity(self.len)),
        };
        // Serializing a struct of &str fields cannot fail.
        let _ = serde_json::to_writer(bytes::BufMut::writer(&mut buf), &self.answer);
        buf.freeze()
    }

    /// The answer's length in bytes.
    pub fn byte_len(&self) -> usize {
        self.len
    }
}

/// The buffer an answer of `len` bytes is given: room for a successor a few bytes longer
/// (JWT claims vary a little).
pub fn answer_capacity(len: usize) -> usize {
    len.next_multiple_of(ANSWER_SLACK)
}

/// An empty answer buffer of `capacity` bytes, for [`ValidTokenAnswer::to_bytes`] to
/// write into.
pub fn blank_answer(capacity: usize) -> Bytes {
    answer_buffer(capacity).freeze()
}

fn answer_buffer(capacity: usize) -> bytes::BytesMut {
    let mut buf = bytes::BytesMut::with_capacity(capacity);
    // Shared from the start: its reference count is allocated once, now, beside the
    // buffer, and stays with it while it is handed from token to token. A Vec-backed
    // answer would allocate one at its first clone (a request) and free it again
    // each time its buffer is taken back: a small allocation per refresh, anywhere
    // in the heap.
    drop(buf.split_off(buf.capacity()));
    buf
}

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
/// ASCII only, so its byte length is the length EmailEngine counts.
pub fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// Answers are allocated in multiples of this, so a refreshed token a few bytes longer
/// than its predecessor still fits in its buffer.
const ANSWER_SLACK: usize = 32;

/// The serialized `{"user","pass"}` answer for a password account.
pub fn password_answer(user: &str, pass: &Secret) -> Result<Bytes, AnswerError> {
    check_user(user)?;
    if js_len(pass.expose()) > MAX_PASS_LEN {
        return Err(AnswerError::Pass);
    }
    Ok(to_bytes(&PasswordAnswer {
        user,
        pass: pass.expose(),
    }))
}

fn check_user(user: &str) -> Result<(), AnswerError> {
    let len = js_len(user);
    if len == 0 || len > MAX_USER_LEN {
        return Err(AnswerError::User);
    }
    Ok(())
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    // One allocation of the exact size: a Vec grown by doubling and then shrunk leaves a
    // freed remainder next to every long-lived 2 KB answer, and with 100k tokens those
    // holes cost tens of MB. Measuring first costs a second pass over ~2 KB.
    let mut body = Vec::with_capacity(serialized_len(value));
    // Serializing a struct of &str fields cannot fail, into a counter or a Vec.
    let _ = serde_json::to_writer(&mut body, value);
    Bytes::from(body)
}

fn serialized_len<T: Serialize>(value: &T) -> usize {
    let mut counter = ByteCounter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// An `io::Write` that only counts what it is given.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON error body `{"error": message, ...}`; callers never put a secret in it.
pub fn error_body(
    message: &str,
    code: Option<&str>,
    provider: Option<&str>,
    hint: Option<&str>,
) -> Bytes {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        provider: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<&'a str>,
    }
    to_bytes(&ErrorBody {
        error: message,
        code,
        provider,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_account_and_proto() {
        let q = parse_query(Some("account=ex&proto=imap")).unwrap();
        assert_eq!(q.account, "ex");
        assert_eq!(q.proto, Some(Proto::Imap));
        let q = parse_query(Some("foo=1&account=a+b%26c")).unwrap();
        assert_eq!(q.account, "a b&c");
        assert_eq!(q.proto, None);
    }

    #[test]
    fn refuses_bad_queries() {
        assert_eq!(parse_query(None), Err(QueryError::MissingAccount));
        assert_eq!(parse_query(Some("account=")), Err(QueryError::EmptyAccount));
        assert_eq!(
            parse_query(Some("account=a&account=b")),
            Err(QueryError::Duplicate("account"))
        );
        assert_eq!(
            parse_query(Some("account=a&proto=pop3")),
            Err(QueryError::UnknownProto)
        );
        assert_eq!(
            parse_query(Some("account=%ff")),
            Err(QueryError::InvalidEncoding("account"))
        );
        for bad in [
            "account=%zz",
            "account=a%2",
            "account=%",
            "account=x&proto=%g1",
        ] {
            assert!(
                matches!(parse_query(Some(bad)), Err(QueryError::InvalidEncoding(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_query(Some("account=%41%2f")).unwrap().account, "A/");
    }

    #[test]
    fn basic_auth_compares_literal_bytes() {
        let creds = BasicCredentials::new("emailengine", &Secret::new("p%40ss"));
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("emailengine:p%40ss")
        );
        let decoded = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("emailengine:p@ss")
        );
        assert!(creds.matches(Some(good.as_bytes())));
        assert!(!creds.matches(Some(decoded.as_bytes())));
        assert!(!creds.matches(None));
        assert!(!creds.matches(Some(b"Bearer abc")));
        assert!(!creds.matches(Some(b"Basic !!!")));
    }

    #[test]
    fn rotation_accepts_old_and_new_pairs() {
        let enc = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let both = BasicCredentials::any_of([
            BasicCredentials::new("ee", &Secret::new("old")),
            BasicCredentials::new("ee", &Secret::new("new")),
        ]);
        assert!(both.matches(Some(enc("ee:old").as_bytes())));
        assert!(both.matches(Some(enc("ee:new").as_bytes())));
        assert!(!both.matches(Some(enc("ee:other").as_bytes())));
    }

    #[test]
    fn answers_are_what_emailengine_validates() {
        let body = token_answer("u@example.com", &Secret::new("tok")).unwrap();
        assert_eq!(
            &body[..],
            br#"{"user":"u@example.com","accessToken":"tok"}"#
        );
        assert_eq!(
            token_answer("u", &Secret::new("")),
            Err(AnswerError::AccessToken)
        );
        let long = "x".repeat(MAX_ACCESS_TOKEN_LEN + 1);
        assert_eq!(
            token_answer("u", &Secret::new(long)),
            Err(AnswerError::AccessToken)
        );
        assert_eq!(
            password_answer("", &Secret::new("p")),
            Err(AnswerError::User)
        );
        for bad in [
            "a b", "a\nb", "a\r", "\0", "a\"b", "a'b", "a\\b", "a=b", "=", "é", "a,b",
        ] {
            assert_eq!(
                token_answer("u", &Secret::new(bad)),
                Err(AnswerError::AccessTokenCharacters),
                "{bad:?}"
            );
        }
        for good in ["ya29.a0Af-_~+/xyz==", "eyJhbGciOi.eyJzdWIi.c2ln", "x", "x="] {
            assert!(token_answer("u", &Secret::new(good)).is_ok(), "{good}");
        }
        let body = password_answer("u", &Secret::new("")).unwrap();
        assert_eq!(&body[..], br#"{"user":"u","pass":""}"#);
    }

    #[test]
    fn a_refreshed_answer_reuses_its_predecessors_buffer_only_when_nobody_holds_it() {
        let old_token = Secret::new("a".repeat(2000));
        let new_token = Secret::new("b".repeat(1990));
        let answer = |t| ValidTokenAnswer::new("u@example.com", t).unwrap();
        let expected = token_answer("u@example.com", &new_token).unwrap();

        let old = answer(&old_token).to_bytes(None);
        let old_ptr = old.as_ptr();
        let new = answer(&new_token).to_bytes(Some(old));
        assert_eq!(new, expected);
        assert_eq!(
            new.as_ptr(),
            old_ptr,
            "a unique, large enough buffer is reused"
        );

        // Served, and the response sent: the buffer comes back for the next token.
        let old = answer(&old_token).to_bytes(None);
        let old_ptr = old.as_ptr();
        drop(old.clone());
        let new = answer(&new_token).to_bytes(Some(old));
        assert_eq!(
            new.as_ptr(),
            old_ptr,
            "a buffer no response holds is reused"
        );

        let old = answer(&old_token).to_bytes(None);
        let served = old.clone();
        let new = answer(&new_token).to_bytes(Some(old));
        assert_eq!(new, expected);
        assert_ne!(new.as_ptr(), served.as_ptr());
        assert_eq!(
            served,
            token_answer("u@example.com", &old_token).unwrap(),
            "an answer still being served is never written over"
        );

        let c = Secret::new("c");
        let short = answer(&c).to_bytes(None);
        let longer = answer(&old_token).to_bytes(Some(short));
        assert_eq!(longer, token_answer("u@example.com", &old_token).unwrap());
    }
}
