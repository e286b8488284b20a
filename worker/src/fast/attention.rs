//! Causal attention of query tokens against one sequence's key/value cache,
//! for the query heads that share one key/value head (GQA).
//!
//! Streaming ("online") softmax over blocks of keys, so a task needs only
//! fixed buffers however long the context is. A prompt's consecutive rows
//! attend together (up to [`MAX_BLOCK_ROWS`]): each block of keys and values
//! is converted from the cache's f16 once and then read by every head of the
//! group and every row of the task, instead of once per row and head (a
//! lone row, as in decoding, reads the cache directly). Where the build has AVX-512, a
//! block's queries (rows × heads, 12 to 32 of them) go one per vector lane
//! ([`attend_lanes`]): scores, softmax and the values' sum then need no sums
//! across lanes. A long context can be split into
//! key ranges whose partial softmax states [`merge`] combines exactly (as in
//! flash-decoding), so one decoding token still keeps every thread busy.
//! Pure functions: the forward pass runs one call per (block of rows, kv
//! head, key range) as parallel tasks.

use std::cell::Cell;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::load::MAX_GROUP;
use super::simd::{accumulate, attend_lanes, attend_lanes_for, exp_shift_sum, scores, KvElem, LANES, LANE_KEYS};

/// Keys per softmax block.
const KB: usize = LANE_KEYS;
/// Query rows one call attends at most.
pub const MAX_BLOCK_ROWS: usize = 16;
/// Queries (rows × heads) from which a call puts them in vector lanes, where
/// the build can ([`attend_lanes`]): below it most lanes would idle.
const LANES_FROM: usize = 12;

/// How many rows to attend together for `group` query heads per kv head:
/// as many as fill the lanes of [`attend_lanes`].
pub fn block_rows(group: usize) -> usize {
    (LANES / group.max(1)).clamp(1, MAX_BLOCK_ROWS)
}

thread_local! {
    /// A block of keys and one of values, converted to f32, then the queries
    /// transposed for [`attend_lanes`] (`(2 · KB + LANES) · hd`).
    static BLOCK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The cache of one layer of one sequence, as `positions × kv_dim` f16.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub kv_dim: usize,
}

/// Streaming-softmax state of one head over some keys: `acc` holds
/// `Σ e^(s_j - m) v_j` (unnormalised), `m` the largest score, `l = Σ e^(s_j - m)`.
/// A task's output is `rows × group` of these, `hd + 2` floats each: `[acc.., m, l]`.
pub fn partial_len(hd: usize) -> usize {
    hd + 2
}

/// Query rows for [`attend_partial`]: row `r`'s heads are `q[r * stride..]`
/// (`group × hd` floats, one head after another), and it sees keys
/// `0..keys[r]` (its position + 1: causal). With `softcap`, each scaled
/// score `s` becomes `cap · tanh(s / cap)` before the softmax (Gemma 2).
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a> {
    pub q: &'a [f32],
    pub stride: usize,
    pub keys: &'a [usize],
    pub softcap: Option<f32>,
}

/// Attends each query row's heads to the keys of `range` it may see, and
/// writes their partial states into `out` (`rows × group × partial_len(hd)`,
/// row by row), to be combined by [`merge`]. A row that sees none of `range`
/// gets an empty state (`m = -inf`, `l = 0`), which `merge` weighs as zero.
/// Each key and value row has this kv head at offset `kv_off`.
pub fn attend_partial(
    qs: Queries<'_>,
    kv: KvView<'_>,
    kv_off: usize,
    range: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    let rows = qs.keys.len();
    let pl = partial_len(hd);
    let group = if rows == 0 { 0 } else { out.len() / (rows * pl) };
    assert!((1..=MAX_BLOCK_ROWS).contains(&rows) && (1..=MAX_GROUP).contains(&group) && out.len() == rows * group * pl);
    assert!((rows - 1) * qs.stride + group * hd <= qs.q.len());
    let end = range.end.min(qs.keys.iter().copied().max().unwrap_or(0));
    assert!(kv.k.len() >= end * kv.kv_dim && kv.v.len() >= end * kv.kv_dim && kv_off + hd <= kv.kv_dim);
    let mut m = [f32::NEG_INFINITY; MAX_BLOCK_ROWS * MAX_GROUP];
    let mut l = [0f32; MAX_BLOCK_ROWS * MAX_GROUP];
    out.fill(0.0);
    let mut block = BLOCK.take();
    if block.len() < (2 * KB + LANES) * hd {
        block.resize((2 * KB + LANES) * hd, 0.0);
    }
    let (kf, rest) = block.split_at_mut(KB * hd);
    let (vf, qt) = rest.split_at_mut(KB * hd);
    let nq = rows * group;
    // The lanes kernel has no soft cap: capped scores take the other path.
    if (LANES_FROM..=LANES).contains(&nq) && attend_lanes_for(hd) && qs.softcap.is_none() {
        // Queries along the lanes: transposed once, scaled here.
        qt.fill(0.0);
        for r in 0..rows {
            for (h, q) in qs.q[r * qs.stride..][..group * hd].chunks_exact(hd).enumerate() {
                for (d, &x) in q.iter().enumerate() {
                    qt[d * LANES + r * group + h] = x * scale;
                }
            }
        }
        let (mut lm, mut ll) = ([f32::NEG_INFINITY; LANES], [0f32; LANES]);
        for j0 in (range.start..end).step_by(KB) {
            let j1 = (j0 + KB).min(end);
            convert(kv, kv_off, j0..j1, hd, kf, vf);
            let mut seen = [0i32; LANES];
            for (i, s) in seen[..nq].iter_mut().enumerate() {
                *s = qs.keys[i / group].min(j1).saturating_sub(j0) as i32;
            }
            attend_lanes(qt, &seen, nq, (kf, vf, j1 - j0), hd, (&mut lm, &mut ll), out, pl);
        }
        m[..nq].copy_from_slice(&lm[..nq]);
        l[..nq].copy_from_slice(&ll[..nq]);
    } else {
        let mut s = [[0f32; KB]; MAX_GROUP];
        let (m, l) = (&mut m[..nq], &mut l[..nq]);
        for j0 in (range.start..end).step_by(KB) {
            let j1 = (j0 + KB).min(end);
            if rows == 1 {
                // One row: its heads read each key straight from the cache
                // (converting it first would only add a pass over it).
                let at = j0 * kv.kv_dim + kv_off;
                let keys = Keys { k: &kv.k[at..], v: &kv.v[at..], stride: kv.kv_dim, first: j0, end: j1 };
                attend_rows(qs, keys, (hd, scale, group), (m, l), out, &mut s);
            } else {
                convert(kv, kv_off, j0..j1, hd, kf, vf);
                let keys = Keys { k: &*kf, v: &*vf, stride: hd, first: j0, end: j1 };
                attend_rows(qs, keys, (hd, scale, group), (m, l), out, &mut s);
            }
        }
    }
    BLOCK.set(block);
    for (i, o) in out.chunks_exact_mut(pl).enumerate() {
        o[hd] = m[i];
        o[hd + 1] = l[i];
    }
}

/// Keys `first..end` of a kv head: key `first + i` at `k[i * stride..]`.
struct Keys<'a, E> {
    k: &'a [E],
    v: &'a [E],
    stride: usize,
    first: usize,
    end: usize,
}

/// One block of keys for each query row in turn (the path without vector
/// lanes): its heads' scores, the online-softmax update and the values' sum.
fn attend_rows<E: KvElem>(
    qs: Queries<'_>,
    keys: Keys<'_, E>,
    (hd, scale, group): (usize, f32, usize),
    (m, l): (&mut [f32], &mut [f32]),
    out: &mut [f32],
    s: &mut [[f32; KB]; MAX_GROUP],
) {
    let pl = partial_len(hd);
    for (r, &seen) in qs.keys.iter().enumerate() {
        let n = seen.min(keys.end).saturating_sub(keys.first);
        if n == 0 {
            continue;
        }
        let q = &qs.q[r * qs.stride..][..group * hd];
        let (m, l) = (&mut m[r * group..][..group], &mut l[r * group..][..group]);
        let out = &mut out[r * group * pl..][..group * pl];
        let (ks, vs) = (&keys.k[..(n - 1) * keys.stride + hd], &keys.v[..(n - 1) * keys.stride + hd]);
        for h in 0..group {
            scores(&q[h * hd..(h + 1) * hd], ks, keys.stride, scale, &mut s[h][..n]);
            if let Some(cap) = qs.softcap {
                s[h][..n].iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
            }
        }
        for h in 0..group {
            let sh = &mut s[h][..n];
            let new_m = sh.iter().fold(m[h], |a, &b| a.max(b));
            let corr = (m[h] - new_m).exp();
            if corr != 1.0 {
                l[h] *= corr;
                out[h * pl..h * pl + hd].iter_mut().for_each(|o| *o *= corr);
            }
            l[h] += exp_shift_sum(sh, new_m);
            m[h] = new_m;
        }
        for h in 0..group {
            accumulate(&mut out[h * pl..h * pl + hd], &s[h][..n], vs, keys.stride);
        }
    }
}

/// Keys and values `keys` of this kv head, f16 → f32, `hd` floats each.
fn convert(kv: KvView<'_>, kv_off: usize, keys: std::ops::Range<usize>, hd: usize, kf: &mut [f32], vf: &mut [f32]) {
    for (i, j) in keys.enumerate() {
        let at = j * kv.kv_dim + kv_off;
        kv.k[at..at + hd].convert_to_f32_slice(&mut kf[i * hd..][..hd]);
        kv.v[at..at + hd].convert_to_f32_slice(&mut vf[i * hd..][..hd]);
    }
}

/// Combines the partial states of one head over disjoint key ranges into
/// the normalised attention output `out` (`hd` floats).
pub fn merge<'a>(parts: impl Iterator<Item = &'a [f32]> + Clone, out: &mut [f32]) {
    let hd = out.len();
    let m = parts.clone().fold(f32::NEG_INFINITY, |a, p| a.max(p[hd]));
    out.fill(0.0);
    let mut l = 0f32;
    for p in parts {
        let w = (p[hd] - m).exp();
        l += p[hd + 1] * w;
        out.iter_mut().zip(&p[..hd]).for_each(|(o, a)| *o += w * a);
    }
    let inv = 1.0 / l;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `softmax(q·Kᵀ · scale) · V` over keys `0..n_keys` for each head of the group
/// into `out` (`group × hd`), in one piece. (The forward pass uses the
/// partial/merge pair to split long contexts over threads.)
pub fn attend(q: &[f32], kv: KvView<'_>, kv_off: usize, n_keys: usize, hd: usize, scale: f32, out: &mut [f32]) {
    let pl = partial_len(hd);
    let mut part = [0f32; MAX_GROUP * (super::load::MAX_HEAD_DIM + 2)];
    let part = &mut part[..q.len() / hd * pl];
    let qs = Queries { q, stride: q.len(), keys: &[n_keys], softcap: None };
    attend_partial(qs, kv, kv_off, 0..n_keys, hd, scale, part);
    for (p, o) in part.chunks_exact(pl).zip(out.chunks_exact_mut(hd)) {
        merge(std::iter::once(p), o);
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::testing::Rng;
    use super::*;

    /// Plain two-pass softmax attention in f32, the textbook way.
    fn reference(q: &[f32], k: &[f32], v: &[f32], kv_dim: usize, off: usize, n: usize, hd: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; q.len()];
        for h in 0..q.len() / hd {
            let qh = &q[h * hd..(h + 1) * hd];
            let s: Vec<f32> = (0..n)
                .map(|j| qh.iter().zip(&k[j * kv_dim + off..][..hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
            let sum: f32 = e.iter().sum();
            for j in 0..n {
                for d in 0..hd {
                    out[h * hd + d] += e[j] / sum * v[j * kv_dim + off + d];
                }
            }
        }
        out
    }

    #[test]
    fn a_block_of_rows_matches_each_row_alone_whole_and_split() {
        let mut rng = Rng(31);
        let group = 3;
        // 2 rows (6 queries) go one row at a time; 5, 7 and 10 rows (15, 21,
        // 30 queries) go in vector lanes where the build has them (one and
        // two vectors, two head sizes).
        for (hd, rows) in [(64, 2), (64, 5), (64, 10), (128, 7)] {
            let (kv_dim, off) = (3 * hd, hd);
            let pl = partial_len(hd);
            for last in [10, 64, 66, 130, 200] {
                // Rows at the last positions: each sees one key more than the one before.
                let keys: Vec<usize> = (last - rows + 1..=last).collect();
                let stride = group * hd + 7;
                let q: Vec<f32> = rng.vec(rows * stride).iter().map(|x| x * 3.0).collect();
                let k: Vec<f16> = rng.vec(last * kv_dim).iter().map(|x| f16::from_f32(x * 3.0)).collect();
                let v: Vec<f16> = rng.vec(last * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
                let (kf, vf): (Vec<f32>, Vec<f32>) = (k.iter().map(|x| x.to_f32()).collect(), v.iter().map(|x| x.to_f32()).collect());
                let kv = KvView { k: &k, v: &v, kv_dim };
                let qs = Queries { q: &q, stride, keys: &keys, softcap: None };
                let scale = 1.0 / (hd as f32).sqrt();
                // Three key ranges; the first rows see none of the last one.
                let cuts = [0, last / 3, last - 2, last];
                let mut parts = vec![0f32; 3 * rows * group * pl];
                for (i, part) in parts.chunks_mut(rows * group * pl).enumerate() {
                    attend_partial(qs, kv, off, cuts[i]..cuts[i + 1], hd, scale, part);
                }
                let mut whole = vec![0f32; rows * group * pl];
                attend_partial(qs, kv, off, 0..last, hd, scale, &mut whole);
                for (r, &n) in keys.iter().enumerate() {
                    let want = reference(&q[r * stride..][..group * hd], &kf, &vf, kv_dim, off, n, hd);
                    for h in 0..group {
                        let at = (r * group + h) * pl;
                        let mut one = vec![0f32; hd];
                        merge(std::iter::once(&whole[at..at + pl]), &mut one);
                        let mut split = vec![0f32; hd];
                        merge((0..3).map(|i| &parts[i * rows * group * pl + at..][..pl]), &mut split);
                        for ((a, b), w) in one.iter().zip(&split).zip(&want[h * hd..(h + 1) * hd]) {
                            assert!((a - w).abs() < 1e-5 && (b - w).abs() < 1e-5, "hd {hd}, {rows} rows, last {last}, row {r}: {a} / {b} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn streaming_softmax_matches_two_pass_reference() {
        let mut rng = Rng(23);
        let (hd, group, kv_dim) = (64, 3, 192);
        for n in [1, 5, 64, 65, 200] {
            let q: Vec<f32> = rng.vec(group * hd).iter().map(|x| x * 3.0).collect();
            let kf: Vec<f32> = rng.vec(n * kv_dim).iter().map(|x| f16::from_f32(*x * 3.0).to_f32()).collect();
            let vf: Vec<f32> = rng.vec(n * kv_dim).iter().map(|x| f16::from_f32(*x).to_f32()).collect();
            let k: Vec<f16> = kf.iter().map(|x| f16::from_f32(*x)).collect();
            let v: Vec<f16> = vf.iter().map(|x| f16::from_f32(*x)).collect();
            let mut out = vec![0f32; group * hd];
            let kv = KvView { k: &k, v: &v, kv_dim };
            attend(&q, kv, 64, n, hd, 1.0 / 8.0, &mut out);
            let want = reference(&q, &kf, &vf, kv_dim, 64, n, hd);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "n={n}: {a} vs {b}");
            }
            // The same keys in three ranges, merged.
            let pl = partial_len(hd);
            let cuts = [0, n / 3, 2 * n / 3, n];
            let mut parts = vec![0f32; 3 * group * pl];
            for (i, part) in parts.chunks_mut(group * pl).enumerate() {
                let qs = Queries { q: &q, stride: q.len(), keys: &[n], softcap: None };
                attend_partial(qs, kv, 64, cuts[i]..cuts[i + 1], hd, 1.0 / 8.0, part);
            }
            for h in 0..group {
                let mut o = vec![0f32; hd];
                let ps = (0..3).filter(|&i| cuts[i] < cuts[i + 1]).map(|i| &parts[(i * group + h) * pl..][..pl]);
                merge(ps, &mut o);
                for (a, b) in o.iter().zip(&want[h * hd..(h + 1) * hd]) {
                    assert!((a - b).abs() < 1e-5, "split n={n}: {a} vs {b}");
                }
            }
        }
    }
}
