//! Bencode (BitTorrent's BEP 3 encoding), the body of every ng message: integers
//! `i42e`, byte strings `4:spam`, lists `l...e` and dictionaries `d...e` with byte-string
//! keys. Decoding is bounded: nesting deeper than [`MAX_DEPTH`] is an error, not a deep
//! recursion (serde_bencode recurses without a limit, so a datagram of `l`s would overflow
//! a worker's stack), and nothing is read past the input.

use std::collections::BTreeMap;

/// Lists and dictionaries nested deeper than this are refused. ng messages nest three
/// levels at most (`flags` in the message, `ssrc` dictionaries in a query's streams).
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    /// Keys in byte order, as bencode writes them.
    Dict(BTreeMap<Vec<u8>, Value>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bencode ends early (at byte {0})")]
    Truncated(usize),
    #[error("bencode: unexpected byte {byte:?} at byte {at}")]
    Unexpected { byte: char, at: usize },
    #[error("bencode: bad integer at byte {0}")]
    BadInteger(usize),
    #[error("bencode: a dictionary key that is not a byte string at byte {0}")]
    BadKey(usize),
    #[error("bencode: nested deeper than {MAX_DEPTH} levels at byte {0}")]
    TooDeep(usize),
    #[error("bencode: {0} bytes after the value")]
    Trailing(usize),
}

impl Value {
    pub fn bytes(text: impl Into<Vec<u8>>) -> Value {
        Value::Bytes(text.into())
    }

    /// A dictionary from `(key, value)` pairs.
    pub fn dict<'a>(entries: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
        Value::Dict(
            entries
                .into_iter()
                .map(|(key, value)| (key.as_bytes().to_vec(), value))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(entries) => entries.get(key.as_bytes()),
            _ => None,
        }
    }

    /// A byte string as text (lossy: ng strings are ASCII or UTF-8 SDP).
    pub fn as_str(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Value::Bytes(bytes) => Some(String::from_utf8_lossy(bytes)),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(n) => out.extend(format!("i{n}e").as_bytes()),
            Value::Bytes(bytes) => {
                out.extend(format!("{}:", bytes.len()).as_bytes());
                out.extend(bytes);
            }
            Value::List(items) => {
                out.push(b'l');
                for item in items {
                    item.encode_into(out);
                }
                out.push(b'e');
            }
            Value::Dict(entries) => {
                out.push(b'd');
                for (key, value) in entries {
                    out.extend(format!("{}:", key.len()).as_bytes());
                    out.extend(key);
                    value.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }
}

/// Exactly one value, the whole input.
pub fn decode(input: &[u8]) -> Result<Value, DecodeError> {
    let mut decoder = Decoder { input, at: 0 };
    let value = decoder.value(0)?;
    match input.len() - decoder.at {
        0 => Ok(value),
        extra => Err(DecodeError::Trailing(extra)),
    }
}

struct Decoder<'a> {
    input: &'a [u8],
    at: usize,
}

impl Decoder<'_> {
    fn peek(&self) -> Result<u8, DecodeError> {
        self.input
            .get(self.at)
            .copied()
            .ok_or(DecodeError::Truncated(self.at))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        match self.peek()? {
            b'i' => {
                self.at += 1;
                Ok(Value::Int(self.integer(b'e')?))
            }
            b'0'..=b'9' => Ok(Value::Bytes(self.string()?)),
            b'l' | b'd' if depth >= MAX_DEPTH => Err(DecodeError::TooDeep(self.at)),
            b'l' => {
                self.at += 1;
                let mut items = Vec::new();
                while self.peek()? != b'e' {
                    items.push(self.value(depth + 1)?);
                }
                self.at += 1;
                Ok(Value::List(items))
            }
            b'd' => {
                self.at += 1;
                let mut entries = BTreeMap::new();
                while self.peek()? != b'e' {
                    if !self.peek()?.is_ascii_digit() {
                        return Err(DecodeError::BadKey(self.at));
                    }
                    let key = self.string()?;
                    let value = self.value(depth + 1)?;
                    entries.insert(key, value);
                }
                self.at += 1;
                Ok(Value::Dict(entries))
            }
            byte => Err(DecodeError::Unexpected {
                byte: byte as char,
                at: self.at,
            }),
        }
    }

    /// Digits (with a leading `-`) up to `end`, which is consumed.
    fn integer(&mut self, end: u8) -> Result<i64, DecodeError> {
        let start = self.at;
        let rest = &self.input[start..];
        let length = rest
            .iter()
            .position(|&b| b == end)
            .ok_or(DecodeError::Truncated(self.input.len()))?;
        let text =
            std::str::from_utf8(&rest[..length]).map_err(|_| DecodeError::BadInteger(start))?;
        let valid = !text.is_empty()
            && text != "-"
            && text
                .trim_start_matches('-')
                .bytes()
                .all(|b| b.is_ascii_digit())
            && text.matches('-').count() <= usize::from(text.starts_with('-'));
        if !valid {
            return Err(DecodeError::BadInteger(start));
        }
        let n = text.parse().map_err(|_| DecodeError::BadInteger(start))?;
        self.at = start + length + 1;
        Ok(n)
    }

    fn string(&mut self) -> Result<Vec<u8>, DecodeError> {
        let start = self.at;
        let length = self.integer(b':')?;
        let length = usize::try_from(length).map_err(|_| DecodeError::BadInteger(start))?;
        let end = self
            .at
            .checked_add(length)
            .filter(|&end| end <= self.input.len())
            .ok_or(DecodeError::Truncated(self.input.len()))?;
        let bytes = self.input[self.at..end].to_vec();
        self.at = end;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kamailio_offer_decodes_and_encodes_back_byte_for_byte() {
        let message = b"d7:call-id5:abc127:command5:offer5:flagsl13:trust-addresse8:from-tag3:t-13:sdp10:v=0\r\no=-\r\ne";
        let value = decode(message).unwrap();
        assert_eq!(value.get("command").unwrap().as_str().unwrap(), "offer");
        assert_eq!(
            value.get("flags").unwrap().as_list().unwrap(),
            [Value::bytes("trust-address")]
        );
        assert_eq!(value.encode(), message);
    }

    #[test]
    fn integers_strings_and_nesting() {
        assert_eq!(decode(b"i-42e").unwrap(), Value::Int(-42));
        assert_eq!(decode(b"i0e").unwrap(), Value::Int(0));
        assert_eq!(decode(b"0:").unwrap(), Value::bytes(""));
        assert_eq!(
            decode(b"lli1eee").unwrap(),
            Value::List(vec![Value::List(vec![Value::Int(1)])])
        );
        // Keys come out sorted whatever order they came in.
        assert_eq!(
            decode(b"d1:bi2e1:ai1ee").unwrap().encode(),
            b"d1:ai1e1:bi2ee"
        );
    }

    #[test]
    fn malformed_input_is_an_error_that_says_where() {
        for (input, error) in [
            (&b""[..], DecodeError::Truncated(0)),
            (b"i12", DecodeError::Truncated(3)),
            (b"ie", DecodeError::BadInteger(1)),
            (b"i-e", DecodeError::BadInteger(1)),
            (b"i1-2e", DecodeError::BadInteger(1)),
            (b"i99999999999999999999e", DecodeError::BadInteger(1)),
            (b"5:abc", DecodeError::Truncated(5)),
            (b"-1:a", DecodeError::Unexpected { byte: '-', at: 0 }),
            (b"l", DecodeError::Truncated(1)),
            (b"di1ei2ee", DecodeError::BadKey(1)),
            (b"x", DecodeError::Unexpected { byte: 'x', at: 0 }),
            (b"i1ei2e", DecodeError::Trailing(3)),
            (b"18446744073709551616:", DecodeError::BadInteger(0)),
        ] {
            assert_eq!(
                decode(input),
                Err(error),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing_into_it() {
        let deep = vec![b'l'; 60_000];
        assert_eq!(decode(&deep), Err(DecodeError::TooDeep(MAX_DEPTH)));
        let mut fine = vec![b'l'; MAX_DEPTH];
        fine.extend(vec![b'e'; MAX_DEPTH]);
        assert!(decode(&fine).is_ok());
    }
}
