//! The CHAIR-style grounding verifier on hand-checked responses, and CHAIR-i / CHAIR-s aggregation.

use anyhow::Result;
use r1v2_actors::verifiers::grounding::{
    chair_i, chair_s, GroundingConfig, GroundingScope, GroundingVerifier,
};
use r1v2_actors::verifiers::{Verdict, Verifier, VerifyInput};
use serde_json::json;

fn verify(
    verifier: &GroundingVerifier,
    response: &str,
    meta: serde_json::Value,
) -> Result<Verdict> {
    let input = VerifyInput {
        prompt: "Describe the image.",
        response,
        answer: "",
        meta: &meta,
    };
    Ok(verifier.verify(&input)?)
}

fn default_verifier() -> Result<GroundingVerifier> {
    Ok(GroundingVerifier::new(GroundingConfig::default())?)
}

#[test]
fn synonyms_plurals_and_unsupported_objects() -> Result<()> {
    let v = default_verifier()?;
    assert_eq!(v.name(), "grounding");
    // Mentions: puppy -> dog (annotated), frisbees -> frisbee (annotated), cat (not), sofa -> couch (not).
    let verdict = verify(
        &v,
        "A puppy catches two frisbees while a cat watches from the sofa.",
        json!({"objects": ["dog", "frisbee", "person"]}),
    )?;
    let flags = verdict.hallucination.clone().expect("grounding sets flags");
    assert_eq!(flags.claims_checked, 4);
    assert_eq!(
        flags.unsupported,
        vec!["cat".to_string(), "couch".to_string()]
    );
    assert_eq!(verdict.score, 0.5); // 1 - 2/4
    assert!(
        verdict
            .reason
            .contains("2 of 4 claims unsupported: cat, couch"),
        "{}",
        verdict.reason
    );
    Ok(())
}

#[test]
fn multiword_objects_win_over_their_last_word() -> Result<()> {
    let v = default_verifier()?;
    // "hot dog" is food, not a dog; "teddy bear" is a toy, not a bear.
    let verdict = verify(
        &v,
        "A child holds a hot dog and a teddy bear.",
        json!({"objects": ["person", "hot dog", "teddy bear"]}),
    )?;
    let flags = verdict.hallucination.expect("flags");
    assert_eq!(flags.claims_checked, 3);
    assert!(flags.unsupported.is_empty());
    assert_eq!(verdict.score, 1.0);
    Ok(())
}

#[test]
fn negated_mentions_are_not_claims() -> Result<()> {
    let v = default_verifier()?;
    let verdict = verify(
        &v,
        "There is no cat here. The man isn't holding an umbrella, but a dog sits by him.",
        json!({"objects": ["person", "dog"]}),
    )?;
    let flags = verdict.hallucination.expect("flags");
    // Claims: man -> person, dog. "no cat" and "isn't holding an umbrella" are negated.
    assert_eq!(flags.claims_checked, 2);
    assert!(flags.unsupported.is_empty(), "{:?}", flags.unsupported);

    // With negation handling off, both negated objects become unsupported claims.
    let off = GroundingVerifier::new(GroundingConfig {
        negation_window: 0,
        ..Default::default()
    })?;
    let verdict = verify(
        &off,
        "There is no cat here. The man isn't holding an umbrella, but a dog sits by him.",
        json!({"objects": ["person", "dog"]}),
    )?;
    let flags = verdict.hallucination.expect("flags");
    assert_eq!(flags.claims_checked, 4);
    assert_eq!(
        flags.unsupported,
        vec!["cat".to_string(), "umbrella".to_string()]
    );
    Ok(())
}

#[test]
fn attributes_are_checked_where_annotated() -> Result<()> {
    let v = default_verifier()?;
    let meta = json!({"objects": ["dog", "car", "orange"], "attributes": {"dog": ["brown"]}});
    // "black dog": dog annotated brown -> unsupported attribute claim; "red car": car has no attribute
    // entry -> not checked; "orange" alone is the fruit (annotated).
    let verdict = verify(
        &v,
        "A black dog next to a red car eats an orange.",
        meta.clone(),
    )?;
    let flags = verdict.hallucination.expect("flags");
    // Claims: dog, black dog, car, orange.
    assert_eq!(flags.claims_checked, 4);
    assert_eq!(flags.unsupported, vec!["black dog".to_string()]);
    assert_eq!(verdict.score, 0.75);

    // "orange cat": colour before an object is an attribute, not the fruit; cat is unsupported.
    let verdict = verify(&v, "A brown dog and an orange cat.", meta)?;
    let flags = verdict.hallucination.expect("flags");
    assert_eq!(flags.claims_checked, 3); // dog, brown dog, cat
    assert_eq!(flags.unsupported, vec!["cat".to_string()]);
    Ok(())
}

#[test]
fn scope_selects_reasoning_or_answer() -> Result<()> {
    let meta = json!({"objects": ["dog"]});
    let response =
        "<think>Maybe that is a cat near the dog.</think> The answer: a dog and a horse.";
    let both = verify(&default_verifier()?, response, meta.clone())?
        .hallucination
        .expect("flags");
    assert_eq!(
        both.unsupported,
        vec!["cat".to_string(), "horse".to_string()]
    );
    let answer_only = GroundingVerifier::new(GroundingConfig {
        scope: GroundingScope::Answer,
        ..Default::default()
    })?;
    let answer = verify(&answer_only, response, meta.clone())?
        .hallucination
        .expect("flags");
    assert_eq!(answer.unsupported, vec!["horse".to_string()]);
    assert_eq!(answer.claims_checked, 2);
    let reasoning_only = GroundingVerifier::new(GroundingConfig {
        scope: GroundingScope::Reasoning,
        ..Default::default()
    })?;
    let reasoning = verify(&reasoning_only, response, meta)?
        .hallucination
        .expect("flags");
    assert_eq!(reasoning.unsupported, vec!["cat".to_string()]);
    Ok(())
}

#[test]
fn extra_vocabulary_from_config() -> Result<()> {
    let config: GroundingConfig = serde_json::from_value(json!({
        "extra_objects": {"lamp": ["lantern"]},
        "extra_attributes": ["striped"]
    }))?;
    let v = GroundingVerifier::new(config)?;
    let verdict = verify(
        &v,
        "Two lanterns light a striped cat.",
        json!({"objects": ["cat"], "attributes": {"cat": ["gray"]}}),
    )?;
    let flags = verdict.hallucination.expect("flags");
    assert_eq!(flags.claims_checked, 3); // lamp, cat, striped cat
    assert_eq!(
        flags.unsupported,
        vec!["lamp".to_string(), "striped cat".to_string()]
    );

    let unknown = serde_json::from_value::<GroundingConfig>(json!({"negation": 2}));
    assert!(unknown.is_err(), "unknown keys are errors");
    let empty = GroundingVerifier::new(GroundingConfig {
        extra_objects: [("lamp".to_string(), vec![" ".to_string()])].into(),
        ..Default::default()
    });
    assert!(empty
        .unwrap_err()
        .to_string()
        .contains("grounding.extra_objects.lamp"));
    Ok(())
}

#[test]
fn bad_annotations_are_errors_naming_the_key() -> Result<()> {
    let v = default_verifier()?;
    let missing = verify(&v, "A dog.", json!({})).unwrap_err().to_string();
    assert!(missing.contains("meta.objects"), "{missing}");
    let bad = verify(
        &v,
        "A dog.",
        json!({"objects": ["dog"], "attributes": {"dog": "brown"}}),
    );
    assert!(bad.unwrap_err().to_string().contains("meta.attributes.dog"));
    let none = verify(&v, "Nothing to see.", json!({"objects": []}))?;
    assert_eq!(none.score, 1.0);
    assert_eq!(none.hallucination.expect("flags").claims_checked, 0);
    Ok(())
}

#[test]
fn chair_aggregates_over_verdicts() -> Result<()> {
    let v = default_verifier()?;
    let meta = json!({"objects": ["dog", "person"]});
    let verdicts = vec![
        verify(&v, "A dog and a cat.", meta.clone())?, // 2 claims, 1 unsupported
        verify(&v, "A man with a dog.", meta.clone())?, // 2 claims, 0 unsupported
        verify(&v, "A horse, a cow, a dog.", meta)?,   // 3 claims, 2 unsupported
        Verdict::zero("no flags"),                     // ignored
    ];
    // CHAIR-i = (1 + 0 + 2) / (2 + 2 + 3) = 3/7; CHAIR-s = 2 of 3 flagged responses.
    assert!((chair_i(&verdicts).expect("claims") - 3.0 / 7.0).abs() < 1e-12);
    assert!((chair_s(&verdicts).expect("flagged") - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(chair_i(&verdicts[3..]), None);
    assert_eq!(chair_s(&verdicts[3..]), None);
    Ok(())
}

#[test]
fn recall_scores_what_a_listing_leaves_out() -> Result<()> {
    let mut extra = std::collections::BTreeMap::new();
    for shape in ["circle", "square", "triangle"] {
        extra.insert(shape.to_string(), vec![]);
    }
    let v = GroundingVerifier::new(GroundingConfig {
        extra_objects: extra,
        ..GroundingConfig::default()
    })?;
    let meta = json!({"objects": ["circle", "square"],
        "attributes": {"circle": ["red"], "square": ["blue"]}, "recall": true});
    // Annotated: circle, square, red circle, blue square. All four named: 1.
    let full = verify(&v, "a red circle and a blue square", meta.clone())?;
    assert_eq!(full.score, 1.0, "{}", full.reason);
    // Half of them named, nothing false: precision 1, recall 0.5.
    let half = verify(&v, "a red circle", meta.clone())?;
    assert_eq!(half.score, 0.5, "{}", half.reason);
    assert!(half.reason.contains("recall 0.50"), "{}", half.reason);
    // Nothing named scores 0 with recall (1 without it).
    assert_eq!(verify(&v, "nothing here", meta.clone())?.score, 0.0);
    let mut no_recall = meta.clone();
    no_recall["recall"] = json!(false);
    assert_eq!(verify(&v, "nothing here", no_recall)?.score, 1.0);
    // A false claim costs precision too: claims circle, red circle, square, green square -> 1 of 4 false;
    // named 3 of 4 annotated: 0.75 * 0.75.
    let wrong = verify(&v, "a red circle and a green square", meta)?;
    assert_eq!(wrong.score, 0.5625, "{}", wrong.reason);
    Ok(())
}
