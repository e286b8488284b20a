//! Writes a copy of a GGUF with its weight matrices re-quantized by candle,
//! so the engines can be benchmarked on weight types no demo file ships:
//! `requantize IN OUT TYPE [FALLBACK]`, TYPE and FALLBACK one of q4_0, q4_1,
//! q5_0, q5_1, q8_0, q4k, q5k, q6k. Matrices whose rows are not a multiple of
//! TYPE's block get FALLBACK (default q5_1), as llama.cpp's quantizer falls
//! back on such rows; norms, the token embeddings and the output head are
//! copied as they are.
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

fn dtype(name: &str) -> GgmlDType {
    match name {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        other => panic!("unknown type {other:?} (q4_0, q4_1, q5_0, q5_1, q8_0, q4k, q5k, q6k)"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, kind, rest @ ..] = args.as_slice() else {
        panic!("usage: requantize IN OUT TYPE [FALLBACK]");
    };
    let (kind, fallback) = (dtype(kind), dtype(rest.first().map_or("q5_1", String::as_str)));
    let mut file = std::fs::File::open(input).expect("open the input GGUF");
    let ct = gguf_file::Content::read(&mut file).expect("read the GGUF header");
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for name in names {
        let t = ct.tensor(&mut file, name, &Device::Cpu).expect("read a tensor");
        let dims = t.shape().dims().to_vec();
        let matrix = dims.len() == 2 && name.starts_with("blk.");
        let t = if matrix {
            let cols = dims[1];
            let to = if cols.is_multiple_of(kind.block_size()) { kind } else { fallback };
            QTensor::quantize(&t.dequantize(&Device::Cpu).expect("dequantize"), to).expect("quantize")
        } else {
            t
        };
        *counts.entry(format!("{:?}", t.dtype())).or_default() += 1;
        tensors.push((name.clone(), t));
    }
    let mut out = std::fs::File::create(output).expect("create the output GGUF");
    let meta: Vec<(&str, &gguf_file::Value)> = ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &meta, &ts).expect("write the GGUF");
    println!("wrote {output}: tensors by type {counts:?}");
}
