//! Reading a GGUF file's header (metadata and tensor table) with candle's parser.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Content;

/// Parses the header of the GGUF file `file`, leaving the file's own offset
/// wherever the parse left it (the weights are read at their offsets).
///
/// Buffered: the header is ~100k small reads (each vocabulary string and
/// merge is one), a syscall apiece on the bare file. And positioned: candle
/// asks for the stream position before each string, which a `BufReader`
/// answers with an `lseek` on the file (80,574 for the demo model, which
/// took its header from ~20 to ~9 ms); `Positioned` answers from a counter.
pub fn read_header(file: &mut File) -> candle_core::Result<Content> {
    let pos = file.stream_position()?;
    Content::read(&mut Positioned { inner: BufReader::with_capacity(1 << 20, file), pos })
}

/// A reader that keeps its own stream position.
struct Positioned<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Positioned<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Positioned<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same header as candle reads from the bare file.
    #[test]
    fn reads_the_header_candle_reads() {
        let path = crate::fast::tests::demo_model();
        let plain = Content::read(&mut File::open(&path).unwrap()).unwrap();
        let fast = read_header(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!(fast.tensor_data_offset, plain.tensor_data_offset);
        assert_eq!(fast.metadata.len(), plain.metadata.len());
        for (k, v) in &plain.metadata {
            assert_eq!(format!("{:?}", fast.metadata[k]), format!("{v:?}"), "{k}");
        }
        assert_eq!(fast.tensor_infos.len(), plain.tensor_infos.len());
        for (k, t) in &plain.tensor_infos {
            let f = &fast.tensor_infos[k];
            assert_eq!((f.offset, f.shape.dims(), f.ggml_dtype), (t.offset, t.shape.dims(), t.ggml_dtype), "{k}");
        }
    }
}
