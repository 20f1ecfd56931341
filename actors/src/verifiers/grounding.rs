//! Grounding verifier: CHAIR-style object (and attribute) hallucination check.
//!
//! Reference: Rohrbach et al. 2018, "Object Hallucination in Image Captioning" (CHAIR). A response's object
//! mentions are found with a vocabulary of object words (each with synonyms and plural forms, mapped to one
//! canonical name, modelled on CHAIR's COCO synonym list) and compared with the image's annotation in the
//! dataset line's `meta`:
//!
//! ```json
//! {"objects": ["dog", "frisbee"], "attributes": {"dog": ["brown"]}}
//! ```
//!
//! A mentioned object that is not annotated is unsupported; so is an attribute word (a colour, by default)
//! placed just before an object whose annotated attributes do not include it (checked only for objects that
//! have an `attributes` entry). Mentions preceded by a negation in the same sentence ("there is no cat")
//! are not claims. Per response: CHAIR-i = unsupported / claims, CHAIR-s = 1 if any is unsupported;
//! the score is 1 - CHAIR-i, times the recall (annotated objects and attribute-object pairs named / all
//! annotated) when `meta.recall` is true (for "list what you see" questions, where saying nothing is not
//! grounded but empty);
//! [`chair_i`] and [`chair_s`] aggregate a set of verdicts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::{HallucinationFlags, Verdict, Verifier, VerifyInput};
use crate::{Error, Result};

/// Built-in vocabulary: COCO's 80 categories with synonyms after CHAIR's `synonyms.txt` (a subset).
/// The first word of each line is the canonical name. Plurals are added automatically.
#[rustfmt::skip]
const COCO_SYNONYMS: &[&[&str]] = &[
    &["person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid"],
    &["person", "player", "guy", "lady", "baby", "skier", "surfer", "rider"],
    &["bicycle", "bike", "cycle"], &["car", "automobile", "sedan", "taxi"],
    &["motorcycle", "motorbike", "scooter"], &["airplane", "plane", "jet", "aircraft", "airliner"],
    &["bus", "buses"], &["train", "locomotive"], &["truck", "pickup", "lorry"],
    &["boat", "ship", "canoe", "kayak", "sailboat"], &["traffic light", "stoplight", "traffic signal"],
    &["fire hydrant", "hydrant"], &["stop sign"], &["parking meter", "meter"], &["bench"],
    &["bird", "pigeon", "seagull", "duck", "parrot"], &["cat", "kitten", "kitty"], &["dog", "puppy", "pup"],
    &["horse", "pony", "foal"], &["sheep", "lamb"], &["cow", "cattle", "calf", "bull", "ox"], &["elephant"],
    &["bear"], &["zebra"], &["giraffe"], &["backpack", "rucksack"], &["umbrella", "parasol"],
    &["handbag", "purse"], &["tie", "necktie"], &["suitcase", "luggage"], &["frisbee"], &["skis", "ski"],
    &["snowboard"], &["sports ball", "ball", "soccer ball", "football", "baseball"], &["kite"],
    &["baseball bat", "bat"], &["baseball glove", "glove", "mitt"], &["skateboard"], &["surfboard"],
    &["tennis racket", "racket", "racquet"], &["bottle"], &["wine glass"], &["cup", "mug"], &["fork"],
    &["knife", "knives"], &["spoon"], &["bowl"], &["banana"], &["apple"], &["sandwich", "burger"],
    &["orange"], &["broccoli"], &["carrot"], &["hot dog"], &["pizza"], &["donut", "doughnut"],
    &["cake", "cupcake"], &["chair", "stool"], &["couch", "sofa"], &["potted plant", "houseplant"], &["bed"],
    &["dining table", "table", "desk"], &["toilet"], &["tv", "television", "monitor", "screen"],
    &["laptop", "computer"], &["mouse", "mice"], &["remote"], &["keyboard"],
    &["cell phone", "phone", "smartphone", "cellphone"], &["microwave"], &["oven", "stove"], &["toaster"],
    &["sink"], &["refrigerator", "fridge"], &["book", "novel"], &["clock"], &["vase"], &["scissors"],
    &["teddy bear", "teddy"], &["hair drier", "hairdryer"], &["toothbrush"],
];

/// Built-in attribute words: colours.
const COLOURS: &[&str] = &[
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "silver", "gold",
];

/// Words that negate the object mentions after them in the same sentence.
const NEGATIONS: &[&str] = &[
    "no", "not", "without", "never", "none", "nor", "neither", "nothing",
];

/// Words that end a negation's reach ("no cat but a dog": the dog is a claim).
const CONTRASTS: &[&str] = &[
    "but", "however", "although", "though", "while", "yet", "instead",
];

/// Which part of the response is searched for mentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroundingScope {
    /// Only the final answer (after `</think>`; the whole response when there is none).
    Answer,
    /// Only the reasoning (inside `<think>...</think>`).
    Reasoning,
    /// Both.
    #[default]
    Both,
}

/// Configuration of the grounding verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroundingConfig {
    /// Where mentions are searched (default: both reasoning and answer).
    pub scope: GroundingScope,
    /// Extra object words: canonical name -> synonyms (plurals added), on top of the built-in COCO list;
    /// a word the built-in list already has is re-mapped to the extra canonical name.
    pub extra_objects: BTreeMap<String, Vec<String>>,
    /// Extra attribute words added to the built-in colours.
    pub extra_attributes: Vec<String>,
    /// Check attribute claims ("brown dog") against `meta.attributes` (default true).
    pub check_attributes: bool,
    /// A negation this many words or fewer before a mention cancels it (default 4; 0 disables).
    pub negation_window: usize,
}

impl Default for GroundingConfig {
    fn default() -> Self {
        Self {
            scope: GroundingScope::Both,
            extra_objects: BTreeMap::new(),
            extra_attributes: Vec::new(),
            check_attributes: true,
            negation_window: 4,
        }
    }
}

/// Adds the regular plural forms of the last word of `phrase` ("hot dog" -> "hot dogs").
fn with_plurals(phrase: &str) -> Vec<String> {
    let mut forms = vec![phrase.to_string()];
    let (head, last) = match phrase.rsplit_once(' ') {
        Some((head, last)) => (format!("{head} "), last),
        None => (String::new(), phrase),
    };
    if last.ends_with('s') || last.ends_with('x') || last.ends_with("ch") || last.ends_with("sh") {
        forms.push(format!("{head}{last}es"));
    } else if let Some(stem) = last
        .strip_suffix('y')
        .filter(|s| !s.ends_with(['a', 'e', 'o', 'u']))
    {
        forms.push(format!("{head}{stem}ies"));
    } else {
        forms.push(format!("{head}{last}s"));
    }
    forms
}

/// The object vocabulary: surface form (1 to 3 lowercase words) -> canonical name.
#[derive(Debug, Clone)]
struct Vocabulary {
    forms: HashMap<String, String>,
    max_words: usize,
}

impl Vocabulary {
    fn new(extra: &BTreeMap<String, Vec<String>>) -> Result<Self> {
        let mut forms = HashMap::new();
        let mut add = |canonical: &str, word: &str| {
            for form in with_plurals(&normalise(word)) {
                forms.entry(form).or_insert_with(|| canonical.to_string());
            }
        };
        for (canonical, synonyms) in extra {
            let canonical = normalise(canonical);
            if canonical.is_empty() || synonyms.iter().any(|s| normalise(s).is_empty()) {
                return Err(Error::Config {
                    key: format!("grounding.extra_objects.{canonical}"),
                    msg: "object words must not be empty".into(),
                });
            }
            add(&canonical, &canonical);
            synonyms.iter().for_each(|s| add(&canonical, s));
        }
        for line in COCO_SYNONYMS {
            line.iter().for_each(|word| add(line[0], word));
        }
        let max_words = forms
            .keys()
            .map(|f| f.split(' ').count())
            .max()
            .unwrap_or(1);
        Ok(Self { forms, max_words })
    }

    fn canonical(&self, word: &str) -> String {
        let word = normalise(word);
        self.forms.get(&word).cloned().unwrap_or(word)
    }
}

/// Lowercases and collapses whitespace.
fn normalise(s: &str) -> String {
    s.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One object mention found in a text.
#[derive(Debug, Clone, PartialEq)]
struct Mention {
    object: String,
    /// The attribute word right before the mention, if any.
    attribute: Option<String>,
}

/// The CHAIR-style grounding verifier.
#[derive(Debug, Clone)]
pub struct GroundingVerifier {
    config: GroundingConfig,
    vocabulary: Vocabulary,
    attributes: BTreeSet<String>,
}

impl GroundingVerifier {
    /// Builds the vocabulary; an empty extra object word is an error naming its key.
    pub fn new(config: GroundingConfig) -> Result<Self> {
        let vocabulary = Vocabulary::new(&config.extra_objects)?;
        let attributes = COLOURS
            .iter()
            .map(|c| c.to_string())
            .chain(config.extra_attributes.iter().map(|a| normalise(a)))
            .collect();
        Ok(Self {
            config,
            vocabulary,
            attributes,
        })
    }

    /// The texts to search, by [`GroundingScope`].
    fn texts<'a>(&self, response: &'a str) -> Vec<&'a str> {
        let (reasoning, answer) = match response.split_once("</think>") {
            Some((reasoning, answer)) => {
                (reasoning.trim_start().trim_start_matches("<think>"), answer)
            }
            None => ("", response),
        };
        match self.config.scope {
            GroundingScope::Answer => vec![answer],
            GroundingScope::Reasoning => vec![reasoning],
            GroundingScope::Both => vec![reasoning, answer],
        }
    }

    /// The longest vocabulary phrase starting at word `i`: (its length in words, canonical object).
    fn match_at(&self, words: &[String], i: usize) -> Option<(usize, String)> {
        let longest = self.vocabulary.max_words.min(words.len().saturating_sub(i));
        (1..=longest).rev().find_map(|n| {
            let phrase = words[i..i + n].join(" ");
            self.vocabulary
                .forms
                .get(&phrase)
                .map(|object| (n, object.clone()))
        })
    }

    /// The non-negated object mentions of `text`, longest vocabulary match first.
    fn mentions(&self, text: &str) -> Vec<Mention> {
        let mut found = Vec::new();
        for sentence in text.split(['.', '!', '?', ';', '\n']) {
            let words: Vec<String> = sentence
                .split(|c: char| !(c.is_alphanumeric() || c == '\''))
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect();
            let mut last_negation: Option<usize> = None;
            let mut i = 0;
            while i < words.len() {
                if NEGATIONS.contains(&words[i].as_str()) || words[i].ends_with("n't") {
                    last_negation = Some(i);
                } else if CONTRASTS.contains(&words[i].as_str()) {
                    last_negation = None;
                }
                // An attribute word that is also an object ("orange") before an object is an attribute.
                let is_attribute = self.attributes.contains(words[i].as_str());
                if is_attribute && self.match_at(&words, i + 1).is_some() {
                    i += 1;
                    continue;
                }
                let Some((n, object)) = self.match_at(&words, i) else {
                    i += 1;
                    continue;
                };
                let negated = self.config.negation_window > 0
                    && last_negation.is_some_and(|at| i - at <= self.config.negation_window);
                if !negated {
                    let attribute = i
                        .checked_sub(1)
                        .map(|before| &words[before])
                        .filter(|w| self.attributes.contains(w.as_str()))
                        .cloned();
                    found.push(Mention { object, attribute });
                }
                i += n;
            }
        }
        found
    }
}

/// Canonical object -> its annotated attribute words.
type AnnotatedAttributes = HashMap<String, BTreeSet<String>>;

/// Reads `meta.objects` (required) and `meta.attributes` (optional), canonicalised.
fn annotation(
    meta: &serde_json::Value,
    vocabulary: &Vocabulary,
) -> Result<(BTreeSet<String>, AnnotatedAttributes)> {
    let bad = |key: &str, what: &str| Error::msg(format!("grounding: meta.{key} {what}"));
    let objects = meta
        .get("objects")
        .and_then(|o| o.as_array())
        .ok_or_else(|| bad("objects", "is missing or not an array of strings"))?
        .iter()
        .map(|o| {
            o.as_str()
                .map(|o| vocabulary.canonical(o))
                .ok_or_else(|| bad("objects", "must hold strings"))
        })
        .collect::<Result<BTreeSet<_>>>()?;
    let mut attributes = HashMap::new();
    if let Some(map) = meta.get("attributes").filter(|a| !a.is_null()) {
        let map = map
            .as_object()
            .ok_or_else(|| bad("attributes", "must be an object"))?;
        for (object, values) in map {
            let values = values
                .as_array()
                .ok_or_else(|| {
                    bad(
                        &format!("attributes.{object}"),
                        "must be an array of strings",
                    )
                })?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(normalise)
                        .ok_or_else(|| bad(&format!("attributes.{object}"), "must hold strings"))
                })
                .collect::<Result<BTreeSet<_>>>()?;
            attributes.insert(vocabulary.canonical(object), values);
        }
    }
    Ok((objects, attributes))
}

impl Verifier for GroundingVerifier {
    fn name(&self) -> &str {
        "grounding"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> Result<Verdict> {
        let (objects, attributes) = annotation(input.meta, &self.vocabulary)?;
        let mentions: Vec<Mention> = self
            .texts(input.response)
            .into_iter()
            .flat_map(|t| self.mentions(t))
            .collect();
        // Claims are distinct: an object (or attribute-object pair) said twice is one claim, as in CHAIR.
        let mut claims = BTreeSet::new();
        let mut unsupported = BTreeSet::new();
        for mention in &mentions {
            claims.insert(mention.object.clone());
            if !objects.contains(&mention.object) {
                unsupported.insert(mention.object.clone());
            }
            let annotated = attributes
                .get(&mention.object)
                .filter(|_| self.config.check_attributes);
            if let (Some(attribute), Some(annotated)) = (&mention.attribute, annotated) {
                let claim = format!("{attribute} {}", mention.object);
                claims.insert(claim.clone());
                if !annotated.contains(attribute) {
                    unsupported.insert(claim);
                }
            }
        }
        let claims_checked = claims.len() as u32;
        let unsupported: Vec<String> = unsupported.into_iter().collect();
        let precision = if claims.is_empty() {
            1.0
        } else {
            1.0 - unsupported.len() as f32 / claims.len() as f32
        };
        // `meta.recall = true` ("list what you see" questions): also the share of the annotation named.
        let recall = match input.meta.get("recall").and_then(|r| r.as_bool()) {
            Some(true) => {
                let annotated: BTreeSet<String> = objects
                    .iter()
                    .cloned()
                    .chain(attributes.iter().flat_map(|(object, values)| {
                        values.iter().map(move |v| format!("{v} {object}"))
                    }))
                    .collect();
                let named = annotated.iter().filter(|a| claims.contains(*a)).count();
                Some(named as f32 / annotated.len().max(1) as f32)
            }
            _ => None,
        };
        let score = precision * recall.unwrap_or(1.0);
        let recall_note = recall.map_or(String::new(), |r| format!("; recall {r:.2}"));
        let reason = if claims.is_empty() {
            format!("no checkable object mentions{recall_note}")
        } else if unsupported.is_empty() {
            format!("all {claims_checked} claims supported by the annotation{recall_note}")
        } else {
            format!(
                "{} of {claims_checked} claims unsupported: {}{recall_note}",
                unsupported.len(),
                unsupported.join(", ")
            )
        };
        Ok(Verdict {
            score,
            format_ok: true,
            extracted: Some(claims.into_iter().collect::<Vec<_>>().join(", ")),
            reason,
            hallucination: Some(HallucinationFlags {
                claims_checked,
                unsupported,
            }),
            failure: None,
        })
    }
}

/// CHAIR-i over a set of verdicts: unsupported claims / claims, over the verdicts that carry flags
/// (`None` when they make no claim).
pub fn chair_i<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Option<f64> {
    let (claims, unsupported) = verdicts
        .into_iter()
        .filter_map(|v| v.hallucination.as_ref())
        .fold((0u64, 0u64), |(c, u), f| {
            (c + f.claims_checked as u64, u + f.unsupported.len() as u64)
        });
    (claims > 0).then(|| unsupported as f64 / claims as f64)
}

/// CHAIR-s over a set of verdicts: the share of flagged responses with at least one unsupported claim
/// (`None` when no verdict carries flags).
pub fn chair_s<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Option<f64> {
    let (responses, hallucinating) = verdicts
        .into_iter()
        .filter_map(|v| v.hallucination.as_ref())
        .fold((0u64, 0u64), |(n, h), f| {
            (n + 1, h + u64::from(!f.unsupported.is_empty()))
        });
    (responses > 0).then(|| hallucinating as f64 / responses as f64)
}
