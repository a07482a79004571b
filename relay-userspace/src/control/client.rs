//! A blocking client of the control API (relayctl, tests).

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::protocol::{ErrorBody, PROTOCOL_VERSION, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to relayd at {path}: {source} ({})", connect_hint(.source))]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to relayd: {0}")]
    Io(#[from] io::Error),
    #[error("relayd sent an answer this relayctl does not understand: {0}")]
    Protocol(String),
    /// relayd refused the request; the body says why.
    #[error("{}", .0.message)]
    Refused(ErrorBody),
}

fn connect_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied {
        "run relayctl as root or as a member of the socket's group, control.group"
    } else {
        "is relayd running? see --socket"
    }
}

pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<ControlClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(ControlClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
        })
    }

    /// Sends one request and returns its `result`, or the error relayd answered with.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = Request {
            version: PROTOCOL_VERSION,
            id,
            method: method.to_owned(),
            params,
        };
        let mut line = serde_json::to_vec(&request).expect("requests serialize");
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ClientError::Protocol(
                "connection closed without an answer".into(),
            ));
        }
        let response: Response =
            serde_json::from_str(&answer).map_err(|err| ClientError::Protocol(err.to_string()))?;
        // Id 0: about the connection, not a request (a caller refused, a line too long).
        if response.id == 0
            && let Some(error) = response.error
        {
            return Err(ClientError::Refused(error));
        }
        if response.id != id {
            return Err(ClientError::Protocol(format!(
                "answer to request {} while waiting for {id}",
                response.id
            )));
        }
        match (response.result, response.error) {
            (_, Some(error)) => Err(ClientError::Refused(error)),
            (Some(result), None) => Ok(result),
            (None, None) => Err(ClientError::Protocol("neither result nor error".into())),
        }
    }

    /// [`Self::call`] with the result decoded into `T`.
    pub fn call_as<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<T, ClientError> {
        let result = self.call(method, params)?;
        serde_json::from_value(result).map_err(|err| ClientError::Protocol(err.to_string()))
    }
}
