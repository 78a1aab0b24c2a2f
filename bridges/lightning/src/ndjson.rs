//! Splits a streamed HTTP body into newline-delimited JSON lines, as grpc-gateway writes server
//! streams, with a bound on line length and a clear error for a line cut off by the end.

use futures::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::wire::truncate;

/// Longest line accepted (an LND invoice with many HTLCs stays far below).
pub(crate) const MAX_LINE_BYTES: usize = 4 << 20;

struct Splitter<S> {
    body: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    searched: usize,
    done: bool,
}

/// The non-empty lines of `body`, without their newline. Ends after the first error.
pub(crate) fn lines<S, B, E>(endpoint: &'static str, body: S) -> impl Stream<Item = Result<Vec<u8>>> + Send + 'static
where
    S: Stream<Item = std::result::Result<B, E>> + Send + Unpin + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + 'static,
{
    let state = Splitter { body, buf: Vec::new(), searched: 0, done: false };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            let from = st.searched.min(st.buf.len());
            if let Some(pos) = st.buf[from..].iter().position(|&b| b == b'\n') {
                let end = from + pos;
                let rest = st.buf.split_off(end + 1);
                let mut line = std::mem::replace(&mut st.buf, rest);
                line.truncate(end);
                st.searched = 0;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some((Ok(line), st));
            }
            st.searched = st.buf.len();
            if st.done {
                if st.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let partial = std::mem::take(&mut st.buf);
                st.searched = 0;
                let err = Error::malformed(
                    endpoint,
                    "line",
                    format!(
                        "stream ended inside a line ({} bytes without newline): {:?}",
                        partial.len(),
                        truncate(&String::from_utf8_lossy(&partial), 80)
                    ),
                );
                return Some((Err(err), st));
            }
            if st.buf.len() > MAX_LINE_BYTES {
                st.done = true;
                st.buf.clear();
                st.searched = 0;
                let err = Error::malformed(endpoint, "line", format!("longer than {MAX_LINE_BYTES} bytes"));
                return Some((Err(err), st));
            }
            match st.body.next().await {
                Some(Ok(chunk)) => st.buf.extend_from_slice(chunk.as_ref()),
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    st.searched = 0;
                    return Some((Err(Error::transport(endpoint, &e)), st));
                }
                None => st.done = true,
            }
        }
    })
    .scan(false, |failed, item: Result<Vec<u8>>| {
        let out = if *failed { None } else { Some(item) };
        if matches!(out, Some(Err(_))) {
            *failed = true;
        }
        futures::future::ready(out)
    })
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;

    async fn collect(chunks: Vec<std::result::Result<&'static [u8], std::io::Error>>) -> Vec<Result<String>> {
        lines("GET /s", stream::iter(chunks))
            .map(|r| r.map(|l| String::from_utf8(l).unwrap()))
            .collect::<Vec<_>>()
            .await
    }

    #[tokio::test]
    async fn splits_lines_across_chunks() {
        let out = collect(vec![Ok(b"{\"a\":1}\n{\"b\""), Ok(b":2}\n\n  \n"), Ok(b"{\"c\":3}\n")]).await;
        let out: Vec<String> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(out, ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
    }

    #[tokio::test]
    async fn a_line_cut_off_by_the_end_is_an_error() {
        let out = collect(vec![Ok(b"{\"a\":1}\n{\"result\":{\"r_ha")]).await;
        assert_eq!(out.len(), 2);
        let err = out[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("line: stream ended inside a line (16 bytes without newline)"), "{err}");
    }

    #[tokio::test]
    async fn a_body_error_ends_the_stream_after_one_error() {
        let out = collect(vec![Ok(b"x\n"), Err(std::io::Error::other("reset by peer")), Ok(b"y\n")]).await;
        assert_eq!(out.len(), 2);
        let err = out[1].as_ref().unwrap_err();
        assert!(matches!(err, Error::Transport { .. }), "{err}");
        assert!(err.to_string().contains("reset by peer"));
    }

    #[tokio::test]
    async fn an_endless_line_is_refused() {
        let big: &'static [u8] = Box::leak(vec![b'x'; MAX_LINE_BYTES + 1].into_boxed_slice());
        let out = collect(vec![Ok(big), Ok(b"\n")]).await;
        assert_eq!(out.len(), 1);
        assert!(out[0].as_ref().unwrap_err().to_string().contains("longer than"));
    }
}
