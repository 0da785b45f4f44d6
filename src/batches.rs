//! Cutting an input file into batch bodies of whole lines, for `sundial ingest`.
//!
//! The file is read in large blocks and cut at newlines found with `memchr`; the lines are not
//! taken apart one by one (one `String` per line was a fifth of the client's time), and each
//! body is checked for UTF-8 once.

use std::io::{self, BufRead, BufReader, Read};

/// One batch body: the header line (if any), then up to the batch size of input lines, each
/// ending in a newline.
#[derive(Debug)]
pub struct Cut {
    /// The body, valid UTF-8.
    pub body: Vec<u8>,
    /// Input lines in it (the header not counted).
    pub lines: u64,
    /// Input bytes they took, newlines included.
    pub bytes: u64,
}

/// A batch is cut before it passes this many bytes (far under the servers' 64 MiB body limit,
/// and above their 1 MiB line limit), whatever its number of lines: wide rows make few lines.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

/// Reads batches of at most `lines` lines and about [`MAX_BATCH_BYTES`] from a reader.
pub struct LineBatches<R> {
    reader: BufReader<R>,
    lines: usize,
    max_bytes: usize,
    header: Option<Vec<u8>>,
    /// An error met after the lines of the last batch returned: the next call returns it.
    failed: Option<io::Error>,
    done: bool,
}

impl<R: Read> LineBatches<R> {
    /// Batches of `lines` lines (at least one) from `reader`.
    pub fn new(reader: R, lines: usize) -> LineBatches<R> {
        LineBatches::with_max_bytes(reader, lines, MAX_BATCH_BYTES)
    }

    /// Batches of `lines` lines, cut before they pass `max_bytes` (unless one line is longer:
    /// it makes a batch of its own).
    fn with_max_bytes(reader: R, lines: usize, max_bytes: usize) -> LineBatches<R> {
        LineBatches {
            reader: BufReader::with_capacity(1 << 20, reader),
            lines: lines.max(1),
            max_bytes,
            header: None,
            failed: None,
            done: false,
        }
    }

    /// Reads the first line as a header, repeated at the start of every batch. `None` when the
    /// input is empty.
    pub fn read_header(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        let text = text.strip_suffix('\r').unwrap_or(text).to_string();
        let mut header = text.clone().into_bytes();
        header.push(b'\n');
        self.header = Some(header);
        Ok(Some(text))
    }

    /// The next batch; `Ok(None)` at the end. A read error or bytes that are not UTF-8 end the
    /// input: the whole lines before them come back as a last batch first, then the error.
    pub fn next_batch(&mut self) -> io::Result<Option<Cut>> {
        if let Some(e) = self.failed.take() {
            self.done = true;
            return Err(e);
        }
        if self.done {
            return Ok(None);
        }
        let start = self.header.as_ref().map_or(0, Vec::len);
        let mut body = self.header.clone().unwrap_or_default();
        let mut lines = 0usize;
        while lines < self.lines {
            let block = match self.reader.fill_buf() {
                Ok(block) => block,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A line cut off by the error is not sent: only whole lines before it.
                    let whole = body[start..].iter().rposition(|&b| b == b'\n').map_or(start, |i| start + i + 1);
                    body.truncate(whole);
                    self.failed = Some(e);
                    break;
                }
            };
            if block.is_empty() {
                // The end: a last line without a newline still counts.
                if body.len() > start && body.last() != Some(&b'\n') {
                    body.push(b'\n');
                    lines += 1;
                }
                self.done = true;
                break;
            }
            let wanted = self.lines - lines;
            let (mut take, mut found) = match memchr::memchr_iter(b'\n', block).take(wanted).enumerate().last() {
                Some((i, at)) if i + 1 == wanted => (at + 1, wanted),
                Some((i, _)) => (block.len(), i + 1),
                None => (block.len(), 0),
            };
            let room = self.max_bytes.saturating_sub(body.len());
            let mut full = false;
            if take > room {
                // Only the whole lines that fit. A line begun in an earlier block is finished
                // first, and a batch without a line yet takes one however long it is.
                let at_line_start = body.last().is_none_or(|&b| b == b'\n');
                let fitting = if at_line_start { block[..room].iter().rposition(|&b| b == b'\n') } else { None };
                match fitting {
                    Some(at) => {
                        take = at + 1;
                        found = memchr::memchr_iter(b'\n', &block[..take]).count();
                        full = true;
                    }
                    None if at_line_start && body.len() > start => break,
                    None => {
                        if let Some(at) = memchr::memchr(b'\n', block) {
                            take = at + 1;
                            found = 1;
                            full = true;
                        }
                    }
                }
            }
            // A line that runs on past this block is counted in the block holding its newline.
            body.extend_from_slice(&block[..take]);
            self.reader.consume(take);
            lines += found;
            if full {
                break;
            }
        }
        let checked = match std::str::from_utf8(&body[start..]) {
            Ok(_) => None,
            Err(e) => Some(start + e.valid_up_to()),
        };
        if let Some(valid) = checked {
            // Keep the whole lines before the first bad byte.
            let keep = body[..valid].iter().rposition(|&b| b == b'\n').map_or(start, |i| (i + 1).max(start));
            lines = body[start..keep].iter().filter(|&&b| b == b'\n').count();
            body.truncate(keep);
            // (A read error met first stays the one reported.)
            if self.failed.is_none() {
                self.failed = Some(io::Error::new(io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"));
            }
        }
        if lines == 0 {
            return match self.failed.take() {
                Some(e) => {
                    self.done = true;
                    Err(e)
                }
                None => Ok(None),
            };
        }
        let bytes = (body.len() - start) as u64;
        Ok(Some(Cut { body, lines: lines as u64, bytes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], lines: usize, header: bool) -> (Option<String>, Vec<(String, u64)>, Option<String>) {
        let mut batches = LineBatches::new(input, lines);
        let head = if header { batches.read_header().unwrap() } else { None };
        let mut out = Vec::new();
        loop {
            match batches.next_batch() {
                Ok(Some(cut)) => {
                    assert_eq!(cut.bytes as usize, cut.body.len() - head.as_ref().map_or(0, |h| h.len() + 1));
                    out.push((String::from_utf8(cut.body).unwrap(), cut.lines));
                }
                Ok(None) => return (head, out, None),
                Err(e) => return (head, out, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn cuts_at_the_batch_size_and_repeats_the_header() {
        let (head, out, err) = all(b"a,b\r\n1,2\n3,4\n5,6\n", 2, true);
        assert_eq!(head.as_deref(), Some("a,b"));
        assert_eq!(out, vec![("a,b\n1,2\n3,4\n".to_string(), 2), ("a,b\n5,6\n".to_string(), 1)]);
        assert_eq!(err, None);
    }

    #[test]
    fn a_last_line_without_newline_and_empty_lines_count() {
        let (_, out, _) = all(b"x\n\ny", 10, false);
        assert_eq!(out, vec![("x\n\ny\n".to_string(), 3)]);
        let (_, out, _) = all(b"", 10, false);
        assert!(out.is_empty());
        let (head, out, _) = all(b"h", 10, true);
        assert_eq!(head.as_deref(), Some("h"));
        assert!(out.is_empty());
    }

    #[test]
    fn lines_spanning_blocks_are_whole() {
        // Longer than the 1 MiB block: lines cross block boundaries.
        let mut input = Vec::new();
        for i in 0..200_000 {
            input.extend_from_slice(format!("{i},{}\n", "x".repeat(i % 13)).as_bytes());
        }
        let (_, out, err) = all(&input, 7_777, false);
        assert_eq!(err, None);
        assert_eq!(out.iter().map(|(_, n)| n).sum::<u64>(), 200_000);
        assert!(out[..out.len() - 1].iter().all(|(_, n)| *n == 7_777));
        let joined: String = out.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(joined.as_bytes(), &input[..]);
        for (body, n) in &out {
            assert_eq!(body.matches('\n').count() as u64, *n);
        }
    }

    /// Gives its bytes in pieces of `step`, then fails.
    struct Failing {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at >= self.data.len() {
                return Err(io::Error::other("the disk went away"));
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn a_read_error_sends_only_the_whole_lines_before_it() {
        let failing = Failing { data: b"h\n1,2\n3,4\n5,".to_vec(), at: 0, step: 3 };
        let mut batches = LineBatches::new(failing, 10);
        assert_eq!(batches.read_header().unwrap().as_deref(), Some("h"));
        let cut = batches.next_batch().unwrap().unwrap();
        assert_eq!((String::from_utf8(cut.body).unwrap(), cut.lines, cut.bytes), ("h\n1,2\n3,4\n".to_string(), 2, 8));
        assert!(batches.next_batch().unwrap_err().to_string().contains("the disk went away"));
        assert!(batches.next_batch().unwrap().is_none());
    }

    #[test]
    fn batches_are_cut_at_their_byte_limit_in_whole_lines() {
        let mut input = Vec::new();
        for i in 0..1_000 {
            input.extend_from_slice(format!("{i},{}\n", "y".repeat(i % 37)).as_bytes());
        }
        input.extend_from_slice(format!("long,{}\nlast\n", "z".repeat(300)).as_bytes());
        let mut batches = LineBatches::with_max_bytes(&input[..], 500, 128);
        assert_eq!(batches.read_header().unwrap().as_deref(), Some("0,"));
        let mut joined = b"0,\n".to_vec();
        let mut total = 0;
        while let Some(cut) = batches.next_batch().unwrap() {
            let text = String::from_utf8(cut.body).unwrap();
            let lines: Vec<&str> = text.strip_prefix("0,\n").unwrap().lines().collect();
            assert_eq!(lines.len() as u64, cut.lines);
            // Over the limit only as one long line.
            assert!(text.len() <= 128 || lines.len() == 1, "{} bytes: {text:?}", text.len());
            joined.extend_from_slice(&text.as_bytes()[3..]);
            total += cut.lines;
        }
        assert_eq!(total, 1_001);
        assert_eq!(joined, input);
    }

    #[test]
    fn bad_utf8_sends_the_lines_before_then_fails() {
        let (_, out, err) = all(b"h\n1\n2\n3\xff\n4\n", 10, true);
        assert_eq!(out, vec![("h\n1\n2\n".to_string(), 2)]);
        assert!(err.unwrap().contains("UTF-8"));
        let (_, out, err) = all(b"\xff\n", 10, false);
        assert!(out.is_empty());
        assert!(err.is_some());
    }
}
