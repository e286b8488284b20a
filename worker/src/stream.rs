//! Turns sampled token ids into text deltas that are safe to send: never a
//! split UTF-8 character, never any part of a stop string.
//!
//! Token bytes go through the tokenizer's streaming decoder (which holds back
//! incomplete UTF-8). The resulting text is then held back as long as its tail
//! could still grow into a stop string; once a stop string appears, the text
//! before it is released and generation ends.

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Push<'a> {
    /// Send this text (may be empty) and go on.
    Continue(&'a str),
    /// A stop string was produced: send this text (the part before it) and stop.
    Stop(&'a str),
}

/// Stop-string matching over a stream of text deltas.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    out: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Self::default() }
    }

    /// Adds a delta; returns the text that may be released now.
    pub fn push(&mut self, delta: &str) -> Push<'_> {
        self.pending.push_str(delta);
        let hit = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(pos) = hit {
            self.out.clear();
            self.out.push_str(&self.pending[..pos]);
            self.pending.clear();
            return Push::Stop(&self.out);
        }
        let hold = self.held_back();
        let release = self.pending.len() - hold;
        self.out.clear();
        self.out.push_str(&self.pending[..release]);
        self.pending.drain(..release);
        Push::Continue(&self.out)
    }

    /// The text still held back, released when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest tail of `pending` that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let p = self.pending.as_bytes();
        let mut best = 0;
        for s in &self.stops {
            let s = s.as_bytes();
            let max = (s.len() - 1).min(p.len());
            for k in (best + 1..=max).rev() {
                if p[p.len() - k..] == s[..k] {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut text = String::new();
        for d in deltas {
            match m.push(d) {
                Push::Continue(t) => text.push_str(t),
                Push::Stop(t) => {
                    text.push_str(t);
                    return (text, true);
                }
            }
        }
        text.push_str(&m.finish());
        (text, false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b", "c"]), ("abc".into(), false));
    }

    #[test]
    fn stop_inside_one_delta_cuts_before_it() {
        assert_eq!(run(&["END"], &["hello END world"]), ("hello ".into(), true));
    }

    #[test]
    fn stop_split_across_deltas_is_never_partly_released() {
        let stops = vec!["END".to_owned()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("hello E"), Push::Continue("hello "));
        assert_eq!(m.push("N"), Push::Continue(""));
        assert_eq!(m.push("D!"), Push::Stop(""));
    }

    #[test]
    fn a_false_start_is_released_later() {
        assert_eq!(run(&["END"], &["E", "N", "X", "Y"]), ("ENXY".into(), false));
        assert_eq!(run(&["END"], &["E", "N"]), ("EN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["\n\n", "🐝"], &["a 🐝 b\n\nc"]), ("a ".into(), true));
        // A held-back tail that starts a multi-byte stop string cuts on a char boundary.
        assert_eq!(run(&["éé"], &["xé", "y"]), ("xéy".into(), false));
    }
}
