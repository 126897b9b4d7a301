//! The decoder's headline-writing task on news articles whose first line is the headline (BBC News
//! as shipped: headline, blank line, body), and ROUGE-L, the metric it is scored with.

use crate::text::TextExample;

#[derive(Debug, Clone, PartialEq)]
pub struct HeadlineExample {
    pub key: String,
    pub headline: String,
    pub body: String,
    /// The article's class (for the Dirichlet label skew among devices).
    pub label: usize,
}

/// The article's first non-empty line as its headline and the rest as its body; `None` for an
/// article without both (it cannot be a headline example).
pub fn split_headline(example: &TextExample) -> Option<HeadlineExample> {
    let text = example.text.trim_start();
    let (headline, body) = text.split_once('\n')?;
    let (headline, body) = (headline.trim(), body.trim());
    if headline.is_empty() || body.is_empty() {
        return None;
    }
    Some(HeadlineExample {
        key: example.key.clone(),
        headline: headline.into(),
        body: body.into(),
        label: example.label,
    })
}

/// The instruction a device's model is given, before the article's body.
pub const HEADLINE_INSTRUCTION: &str = "Write a headline for this news article.\n\n";

/// Words as `rouge-score` (Google's reference implementation) sees them without stemming:
/// lower-cased, every run of characters other than `a-z` and `0-9` a separator.
pub fn rouge_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The length of the longest common subsequence of two word lists.
fn longest_common_subsequence(a: &[String], b: &[String]) -> usize {
    let mut previous = vec![0usize; b.len() + 1];
    for word in a {
        let mut current = vec![0usize; b.len() + 1];
        for (j, other) in b.iter().enumerate() {
            current[j + 1] = if word == other { previous[j] + 1 } else { current[j].max(previous[j + 1]) };
        }
        previous = current;
    }
    previous[b.len()]
}

/// ROUGE-L F1 of `candidate` against `reference` (0 when either has no words).
pub fn rouge_l_f1(candidate: &str, reference: &str) -> f64 {
    let (candidate, reference) = (rouge_words(candidate), rouge_words(reference));
    let common = longest_common_subsequence(&candidate, &reference) as f64;
    if common == 0.0 {
        return 0.0;
    }
    let precision = common / candidate.len() as f64;
    let recall = common / reference.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(text: &str) -> TextExample {
        TextExample { key: "business/001.txt".into(), text: text.into(), label: 0 }
    }

    #[test]
    fn the_first_line_is_the_headline_and_the_rest_the_body() {
        let split = split_headline(&example("Ad sales boost Time Warner profit\n\nQuarterly profits jumped.\n\nMore."))
            .unwrap();
        assert_eq!(split.headline, "Ad sales boost Time Warner profit");
        assert_eq!(split.body, "Quarterly profits jumped.\n\nMore.");
        assert_eq!(split_headline(&example("Only a headline\n\n")), None);
        assert_eq!(split_headline(&example("")), None);
    }

    #[test]
    fn rouge_l_matches_hand_computed_values() {
        // LCS of "police kill the gunman" and "police killed the gunman" is 3 words: P = R = 3/4.
        assert!((rouge_l_f1("police killed the gunman", "police kill the gunman") - 0.75).abs() < 1e-12);
        assert_eq!(rouge_l_f1("Same words", "same, WORDS!"), 1.0);
        assert_eq!(rouge_l_f1("", "anything"), 0.0);
        assert_eq!(rouge_l_f1("nothing shared", "at all"), 0.0);
        // P = 2/2, R = 2/4: F1 = 2·1·0.5 / 1.5.
        assert!((rouge_l_f1("profit rises", "Time Warner profit rises") - 2.0 / 3.0).abs() < 1e-12);
        // rouge-score drops characters outside a-z0-9: "Zürich" is the words "z" and "rich".
        assert_eq!(rouge_words("Zürich 3.5%"), ["z", "rich", "3", "5"]);
    }
}
