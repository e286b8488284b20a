//! Picking the next token from the logits: greedy, or temperature with
//! top-k and top-p (nucleus), after an optional repeat penalty.
//!
//! The choices mean what they meant with candle's `LogitsProcessor`, which
//! this replaces: top-k keeps the k likeliest tokens; top-p keeps the
//! likeliest tokens while the probability of those kept before is below p;
//! both together keep those of the top k that top-p over the whole
//! vocabulary keeps (candle's `TopKThenTopP`); the repeat penalty divides a
//! recent token's positive logit by the penalty and multiplies a negative
//! one, once per distinct token. A seed gives the same tokens every time
//! (not the tokens candle drew for it: the draw is another one).
//!
//! Why not candle's: per token it built tensors for the logits, divided and
//! soft-maxed them into new ones, copied them back and built a cumulative
//! table to draw from, and for top-p sorted the whole vocabulary. With the
//! demo model's 49,152 tokens that was ~0.39 ms a token at the default
//! temperature and ~1.35 ms with top-p, against a ~3 ms decode step on the
//! dev VM, on the engine thread while the compute threads waited. Here the
//! probabilities are one vectorized pass into a reused buffer, and only the
//! tokens that can be kept are ranked: those within a factor of the
//! likeliest, widened until they hold enough probability (or enough tokens).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rbee_schemas::job::Sampling;

use crate::fast::simd::exp_shift_sum;

/// First cut for the tokens worth ranking: a probability at least this
/// fraction of the likeliest token's. Lowered 1,000-fold while the tokens
/// above it are too few or hold too little probability.
const FIRST_CUT: f32 = 1e-3;

/// A job's sampler; its random stream starts from the job's seed.
pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repeat_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    repeat_last_n: usize,
    /// Scratch: the logits after the penalty, then unnormalized probabilities.
    probs: Vec<f32>,
    /// Scratch: the token ids being ranked.
    ranked: Vec<u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("temperature", &self.temperature)
            .field("top_k", &self.top_k)
            .field("top_p", &self.top_p)
            .field("repeat_penalty", &self.repeat_penalty)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    pub fn new(seed: u64, s: &Sampling) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            temperature: s.temperature as f32,
            top_k: s.top_k,
            top_p: s.top_p.map(|p| p as f32),
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n,
            probs: Vec::new(),
            ranked: Vec::new(),
        }
    }

    /// The next token after `logits`; `tokens` are the sequence's so far (the
    /// repeat penalty looks at the last `repeat_last_n`). Errs only on logits
    /// with no finite value.
    pub fn sample(&mut self, logits: &[f32], tokens: &[u32]) -> Result<u32, String> {
        if self.temperature <= 0.0 && self.repeat_penalty == 1.0 {
            return Ok(argmax(logits));
        }
        let probs = &mut self.probs;
        probs.clear();
        probs.extend_from_slice(logits);
        if self.repeat_penalty != 1.0 {
            penalize(probs, &tokens[tokens.len().saturating_sub(self.repeat_last_n)..], self.repeat_penalty);
        }
        if self.temperature <= 0.0 {
            return Ok(argmax(probs));
        }
        // e^((l - max) / T): the likeliest token has 1; a NaN logit (next
        // to) nothing.
        let max = probs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        if !max.is_finite() {
            return Err(format!("sampling failed: the logits have no finite maximum ({max})"));
        }
        let inv_t = 1.0 / self.temperature;
        probs.iter_mut().for_each(|x| *x = if x.is_nan() { f32::NEG_INFINITY } else { *x * inv_t });
        let total = exp_shift_sum(probs, max * inv_t);
        let vocab = probs.len();
        let top_k = self.top_k.filter(|&k| k < vocab);
        let top_p = self.top_p.filter(|&p| p > 0.0 && p < 1.0);
        let (probs, ranked) = (&self.probs, &mut self.ranked);
        let desc = |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]);
        let pick = match (top_k, top_p) {
            (None, None) => draw(&mut self.rng, probs.iter().copied(), Some(total)),
            (Some(k), p) => {
                candidates(probs, ranked, 0.0, k);
                if ranked.len() > k {
                    ranked.select_nth_unstable_by(k, desc);
                    ranked.truncate(k);
                }
                if let Some(p) = p {
                    let kept: f32 = ranked.iter().map(|&i| probs[i as usize]).sum();
                    if p * total < kept {
                        ranked.sort_unstable_by(desc);
                        nucleus(probs, ranked, p * total);
                    }
                }
                draw(&mut self.rng, ranked.iter().map(|&i| probs[i as usize]), None).map(|j| ranked[j] as usize)
            }
            (None, Some(p)) => {
                candidates(probs, ranked, p * total, 1);
                ranked.sort_unstable_by(desc);
                nucleus(probs, ranked, p * total);
                draw(&mut self.rng, ranked.iter().map(|&i| probs[i as usize]), None).map(|j| ranked[j] as usize)
            }
        };
        pick.map(|i| i as u32).ok_or_else(|| "sampling failed: no token has a probability".to_owned())
    }
}

/// Index of the first largest logit, as candle's `argmax` picks it (a NaN
/// never wins, unless it is first), in 16 independent lanes (vectorized),
/// then the first position of the maximum.
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else { return 0 };
    if first.is_nan() {
        return 0;
    }
    let mut lanes = [first; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = rest.iter().chain(&lanes).fold(first, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Divides a positive logit by `penalty` and multiplies a negative one, once
/// for each distinct token of `recent` (ids outside the vocabulary ignored).
fn penalize(logits: &mut [f32], recent: &[u32], penalty: f32) {
    for (i, &t) in recent.iter().enumerate() {
        if recent[..i].contains(&t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l >= 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Fills `ranked` with the tokens whose probability is at least a cut below
/// the likeliest's (which is 1), lowering the cut until they hold `mass`
/// and number at least `count`, or are all of them.
fn candidates(probs: &[f32], ranked: &mut Vec<u32>, mass: f32, count: usize) {
    let mut cut = FIRST_CUT;
    loop {
        ranked.clear();
        let mut held = 0.0f32;
        for (i, &p) in probs.iter().enumerate() {
            if p >= cut {
                ranked.push(i as u32);
                held += p;
            }
        }
        if (held >= mass && ranked.len() >= count) || ranked.len() == probs.len() || cut == 0.0 {
            return;
        }
        cut = if cut < 1e-30 { 0.0 } else { cut * 1e-3 };
    }
}

/// Keeps the first tokens of `ranked` (most likely first) while the
/// probability of those before is below `mass`.
fn nucleus(probs: &[f32], ranked: &mut Vec<u32>, mass: f32) {
    let mut before = 0.0f32;
    let keep = ranked
        .iter()
        .position(|&i| {
            let over = before >= mass;
            before += probs[i as usize];
            over
        })
        .unwrap_or(ranked.len());
    ranked.truncate(keep);
}

/// Draws an index with probability proportional to its weight (`total`: their
/// sum, if known); `None` if the weights sum to nothing (or are not finite).
fn draw(rng: &mut StdRng, weights: impl Iterator<Item = f32> + Clone, total: Option<f32>) -> Option<usize> {
    let total = total.map_or_else(|| weights.clone().map(f64::from).sum(), f64::from);
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0f64;
    let mut last = None;
    for (i, w) in weights.enumerate() {
        if w > 0.0 {
            acc += f64::from(w);
            last = Some(i);
            if u < acc {
                return last;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};

    use super::*;

    fn candle_argmax(logits: &[f32]) -> u32 {
        let t = Tensor::from_slice(logits, logits.len(), &Device::Cpu).unwrap();
        LogitsProcessor::from_sampling(0, CandleSampling::ArgMax).sample(&t).unwrap()
    }

    #[test]
    fn argmax_picks_what_candle_picks() {
        // A fixed pseudo-random vocabulary of logits, then the awkward cases.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<f32> = (0..49_152)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / 1e5 - 80.0
            })
            .collect();
        let mut tail_max = random[..49_151].to_vec();
        tail_max[49_150] = 1e9;
        let cases: [&[f32]; 9] = [
            &random,
            &tail_max,
            &[1.0, 3.0, 3.0, 2.0],
            &[-1.0, -1.0],
            &[0.5, f32::NAN, 0.7, 0.1],
            &[f32::NAN, 0.7, 0.9],
            &[f32::NAN, f32::NAN],
            &[f32::NEG_INFINITY, -3.0],
            &[7.0],
        ];
        for logits in cases {
            assert_eq!(argmax(logits), candle_argmax(logits), "logits {:?}", &logits[..logits.len().min(4)]);
        }
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1, "the first of equal maxima");
    }

    fn sampling(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampling {
        Sampling { temperature, top_p, top_k, repeat_penalty: 1.0, repeat_last_n: 64, seed: 7 }
    }

    /// How often each token comes up in `n` draws.
    fn frequencies(s: &Sampling, logits: &[f32], n: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(s.seed, s);
        let mut seen = vec![0usize; logits.len()];
        for _ in 0..n {
            seen[sampler.sample(logits, &[]).unwrap() as usize] += 1;
        }
        seen.iter().map(|&c| c as f64 / n as f64).collect()
    }

    /// Softmax of `logits / t`, in f64.
    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = logits.iter().map(|&l| ((l as f64 - m) / t).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    #[test]
    fn draws_follow_the_tempered_distribution_and_the_filters() {
        let logits = [2.0f32, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0];
        let n = 100_000;
        let close = |got: &[f64], want: &[f64]| {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() < 0.01, "token {i}: drawn {g:.4}, expected {w:.4} ({got:?})");
            }
        };
        // Temperature alone: the softmax.
        close(&frequencies(&sampling(0.8, None, None), &logits, n), &softmax(&logits, 0.8));
        // Top-k 3: the three likeliest, renormalized.
        let p = softmax(&logits, 1.0);
        let z3: f64 = p[..3].iter().sum();
        let want: Vec<f64> = (0..8).map(|i| if i < 3 { p[i] / z3 } else { 0.0 }).collect();
        close(&frequencies(&sampling(1.0, Some(3), None), &logits, n), &want);
        // Top-p 0.7: tokens are kept while those before hold less than 0.7.
        let keep = (0..8).position(|i| p[..i].iter().sum::<f64>() >= 0.7).unwrap();
        let zp: f64 = p[..keep].iter().sum();
        let want: Vec<f64> = (0..8).map(|i| if i < keep { p[i] / zp } else { 0.0 }).collect();
        close(&frequencies(&sampling(1.0, None, Some(0.7)), &logits, n), &want);
        // Both, the nucleus inside the top 5: the same tokens as top-p alone.
        assert!(keep < 5);
        close(&frequencies(&sampling(1.0, Some(5), Some(0.7)), &logits, n), &want);
    }

    #[test]
    fn each_mode_draws_as_candles_logits_processor_did() {
        let logits = [1.2f32, 1.1, 0.4, 0.3, -0.5, -0.6, -2.0, -4.0, 0.9, 1.15];
        let n = 40_000;
        let modes = [
            (sampling(0.7, None, None), CandleSampling::All { temperature: 0.7 }),
            (sampling(1.3, Some(4), None), CandleSampling::TopK { k: 4, temperature: 1.3 }),
            (sampling(1.0, None, Some(0.6)), CandleSampling::TopP { p: 0.6, temperature: 1.0 }),
            (sampling(1.0, Some(3), Some(0.5)), CandleSampling::TopKThenTopP { k: 3, p: 0.5, temperature: 1.0 }),
            (sampling(1.0, Some(6), Some(0.95)), CandleSampling::TopKThenTopP { k: 6, p: 0.95, temperature: 1.0 }),
        ];
        let t = Tensor::from_slice(&logits, logits.len(), &Device::Cpu).unwrap();
        for (ours, theirs) in modes {
            let mut lp = LogitsProcessor::from_sampling(3, theirs.clone());
            let mut want = vec![0.0; logits.len()];
            for _ in 0..n {
                want[lp.sample(&t).unwrap() as usize] += 1.0 / n as f64;
            }
            let got = frequencies(&ours, &logits, n);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 0.015, "{theirs:?}, token {i}: {g:.4} here, {w:.4} from candle");
                assert_eq!(*g == 0.0, *w == 0.0, "{theirs:?}, token {i}: kept by one and not the other");
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_greedy_takes_the_first_maximum() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 7919 % 1000) as f32) / 200.0).collect();
        let s = sampling(0.9, Some(50), Some(0.95));
        let run = || {
            let mut sampler = Sampler::new(s.seed, &s);
            (0..64).map(|_| sampler.sample(&logits, &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let mut greedy = Sampler::new(1, &sampling(0.0, None, None));
        let first_max = logits.iter().position(|&l| l == logits.iter().fold(f32::MIN, |a, &b| a.max(b))).unwrap();
        assert_eq!(greedy.sample(&logits, &[]).unwrap() as usize, first_max);
    }

    #[test]
    fn a_flat_distribution_still_finds_its_nucleus() {
        // Every token equally likely: the first cuts hold too little, and the
        // nucleus of 0.5 is half the vocabulary.
        let logits = vec![0.0f32; 1000];
        let f = frequencies(&sampling(1.0, None, Some(0.5)), &logits, 20_000);
        let kept = f.iter().filter(|&&v| v > 0.0).count();
        assert!((480..=520).contains(&kept), "{kept} tokens drawn");
        // Tokens far below the likeliest are still drawn when top-k needs them.
        let mut steep: Vec<f32> = vec![-60.0; 10];
        steep[0] = 0.0;
        let f = frequencies(&sampling(1.0, Some(10), None), &steep, 1000);
        assert!(f[0] > 0.99);
    }

    #[test]
    fn the_repeat_penalty_lowers_recent_tokens_once_each() {
        let mut logits = [2.0f32, -2.0, 1.0];
        penalize(&mut logits, &[0, 1, 0, 9], 2.0);
        assert_eq!(logits, [1.0, -4.0, 1.0]);
        // Greedy with a penalty: the penalized leader loses its place.
        let s = Sampling { repeat_penalty: 3.0, ..sampling(0.0, None, None) };
        let mut sampler = Sampler::new(0, &s);
        assert_eq!(sampler.sample(&[2.0, 1.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn logits_without_a_finite_value_are_an_error_not_a_token() {
        let mut sampler = Sampler::new(0, &sampling(0.8, None, None));
        assert!(sampler.sample(&[f32::NAN, f32::NAN], &[]).is_err());
        assert!(sampler.sample(&[f32::NEG_INFINITY; 3], &[]).is_err());
        // One NaN among finite logits is never drawn.
        let f = frequencies(&sampling(1.0, None, None), &[0.0, f32::NAN, 0.0], 2000);
        assert_eq!(f[1], 0.0);
    }
}
