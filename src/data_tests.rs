use super::*;

fn write_dataset(dir: &Path, lines: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    std::fs::write(dir.join("img/a.png"), b"not decoded here").unwrap();
    let path = dir.join("set.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

const GOOD_1: &str = r#"{"id": "q1", "question": "2+2?", "images": ["img/a.png"], "answer": "4", "verifier": "math"}"#;
const GOOD_2: &str = r#"{"id": "q2", "question": "pick", "images": [], "answer": "B", "verifier": "choice", "meta": {"src": "mmmu"}}"#;
const BROKEN_JSON: &str = r#"{"id": "q3", "question": "#;
const MISSING_IMAGE: &str = r#"{"id": "q4", "question": "?", "images": ["img/none.png"], "answer": "1", "verifier": "math"}"#;
const UNKNOWN_KEY: &str =
    r#"{"id": "q5", "question": "?", "answer": "1", "verifier": "math", "answr": 2}"#;

#[test]
fn loads_good_lines_and_resolves_images() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_dataset(dir.path(), &[GOOD_1, "", GOOD_2]);
    let set = load_jsonl(&path, OnBadLine::Error).unwrap();
    assert_eq!(set.samples.len(), 2);
    assert!(set.bad_lines.is_empty());
    assert_eq!(set.samples[0].images, vec![dir.path().join("img/a.png")]);
    assert_eq!(set.samples[0].answer, "4");
    assert_eq!(set.samples[1].verifier, "choice");
    assert_eq!(set.samples[1].meta.as_ref().unwrap()["src"], "mmmu");
}

#[test]
fn bad_lines_are_skipped_and_counted_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        GOOD_1,
        BROKEN_JSON,
        MISSING_IMAGE,
        UNKNOWN_KEY,
        GOOD_1,
        GOOD_2,
    ];
    let path = write_dataset(dir.path(), &lines);
    let set = load_jsonl(&path, OnBadLine::Skip).unwrap();
    let ids: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["q1", "q2"]);
    let bad: Vec<usize> = set.bad_lines.iter().map(|b| b.line).collect();
    assert_eq!(bad, [2, 3, 4, 5]);
    let path_str = path.display().to_string();
    assert!(set.bad_lines[0]
        .message
        .starts_with(&format!("{path_str}:2:")));
    assert!(set.bad_lines[1].message.contains("img/none.png"));
    assert!(set.bad_lines[2].message.contains("answr"));
    assert!(set.bad_lines[3].message.contains("duplicate id `q1`"));
}

#[test]
fn bad_line_stops_the_load_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_dataset(dir.path(), &[GOOD_1, GOOD_2, MISSING_IMAGE]);
    let config: DatasetConfig = toml::from_str(&format!(
        "path = {:?}\non_bad_line = \"error\"",
        path.display().to_string()
    ))
    .unwrap();
    let err = Dataset::from_config(&config).unwrap_err().to_string();
    assert!(err.contains("set.jsonl"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("img/none.png"), "{err}");
    let bad_key = toml::from_str::<DatasetConfig>("path = \"x\"\non_bad_line = \"ignore\"");
    assert!(bad_key.is_err());
}

fn numbered_samples(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| Sample {
            id: format!("s{i}"),
            question: format!("question {i}"),
            images: vec![],
            answer: i.to_string(),
            verifier: "math".into(),
            solution: None,
            meta: None,
        })
        .collect()
}

fn ids(batch: &[Sample]) -> Vec<String> {
    batch.iter().map(|s| s.id.clone()).collect()
}

#[test]
fn each_epoch_is_a_fresh_permutation_and_batches_cross_epochs() {
    let mut loader = DataLoader::new(numbered_samples(10), 4, 7).unwrap();
    let first_epoch: Vec<String> = (0..5).flat_map(|_| ids(&loader.next_batch())).collect();
    // 20 samples = two full epochs of 10; each epoch holds every sample once.
    for epoch in first_epoch.chunks(10) {
        let mut sorted = epoch.to_vec();
        sorted.sort();
        let mut expected: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
        expected.sort();
        assert_eq!(sorted, expected);
    }
    assert_ne!(
        first_epoch[..10],
        first_epoch[10..],
        "epochs reuse one order"
    );
    assert_eq!(loader.cursor().epoch, 1);
    assert_eq!(loader.cursor().position, 10);
    // A different seed gives a different order.
    let mut other = DataLoader::new(numbered_samples(10), 10, 8).unwrap();
    assert_ne!(ids(&other.next_batch()), first_epoch[..10]);
}

#[test]
fn resumed_cursor_continues_exactly() {
    let mut uninterrupted = DataLoader::new(numbered_samples(7), 3, 42).unwrap();
    let expected: Vec<Vec<String>> = (0..9).map(|_| ids(&uninterrupted.next_batch())).collect();

    let mut first = DataLoader::new(numbered_samples(7), 3, 42).unwrap();
    let consumed = 4;
    for batch in expected.iter().take(consumed) {
        assert_eq!(&ids(&first.next_batch()), batch);
    }
    let saved = serde_json::to_string(&first.cursor()).unwrap();
    drop(first);
    let cursor: DataCursor = serde_json::from_str(&saved).unwrap();
    let mut resumed = DataLoader::with_cursor(numbered_samples(7), 3, cursor).unwrap();
    for batch in &expected[consumed..] {
        assert_eq!(&ids(&resumed.next_batch()), batch);
    }
}

#[test]
fn loader_rejects_bad_inputs() {
    assert!(DataLoader::new(vec![], 2, 0).is_err());
    assert!(DataLoader::new(numbered_samples(3), 0, 0).is_err());
    let cursor = DataCursor {
        seed: 0,
        epoch: 0,
        position: 0,
        dataset_len: 5,
    };
    let err = DataLoader::with_cursor(numbered_samples(3), 2, cursor).unwrap_err();
    assert!(err.to_string().contains("5 samples"), "{err}");
}
