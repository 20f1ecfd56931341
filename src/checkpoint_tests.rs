use super::*;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn cursor() -> DataCursor {
    DataCursor {
        seed: 3,
        epoch: 1,
        position: 5,
        dataset_len: 9,
    }
}

fn write_marker(dir: &Path, step: u64) -> Result<()> {
    fs::write(dir.join("marker.txt"), step.to_string()).map_err(io_err(dir))
}

#[test]
fn failing_writer_leaves_no_step_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path().join("run")).unwrap();
    let err = run
        .write_checkpoint(4, 0, |dir| {
            fs::write(dir.join("half.bin"), b"partial").unwrap();
            Err(Error::Msg("disk full".into()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("disk full"));
    assert!(!run.checkpoint_dir(4).exists());
    assert_eq!(run.latest_checkpoint().unwrap(), None);
    // Nothing else is left in checkpoints/ either.
    assert_eq!(fs::read_dir(run.checkpoints_dir()).unwrap().count(), 0);
    // An earlier complete checkpoint survives a failed rewrite of the same step.
    run.write_checkpoint(4, 0, |dir| write_marker(dir, 4))
        .unwrap();
    run.write_checkpoint(4, 0, |_| Err(Error::Msg("again".into())))
        .unwrap_err();
    let marker = fs::read_to_string(run.checkpoint_dir(4).join("marker.txt")).unwrap();
    assert_eq!(marker, "4");
}

#[test]
fn leftover_tmp_is_ignored_then_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path()).unwrap();
    run.write_checkpoint(2, 0, |dir| write_marker(dir, 2))
        .unwrap();
    // A crash during step 3's write leaves this behind.
    let leftover = run.checkpoints_dir().join(".tmp-step-3");
    fs::create_dir(&leftover).unwrap();
    fs::write(leftover.join("model.safetensors"), b"trunc").unwrap();
    fs::create_dir(run.checkpoints_dir().join("step-x")).unwrap(); // not a step number
    let latest = run.latest_checkpoint().unwrap().unwrap();
    assert_eq!(latest, (2, run.checkpoint_dir(2)));
    run.write_checkpoint(3, 0, |dir| write_marker(dir, 3))
        .unwrap();
    assert!(!leftover.exists());
    assert_eq!(run.latest_checkpoint().unwrap().unwrap().0, 3);
}

#[test]
fn latest_is_highest_step_and_keep_last_prunes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path()).unwrap();
    for step in [5, 10, 100, 20] {
        run.write_checkpoint(step, 3, |dir| write_marker(dir, step))
            .unwrap();
    }
    let steps: Vec<u64> = run
        .list_checkpoints()
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    // Numeric order (100 > 20), and the oldest (5) pruned to keep 3.
    assert_eq!(steps, [10, 20, 100]);
    assert_eq!(run.latest_checkpoint().unwrap().unwrap().0, 100);
}

#[test]
fn trainer_state_and_model_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path()).unwrap();
    run.write_config("[run]\nseed = 1\n").unwrap();
    assert_eq!(
        fs::read_to_string(run.config_path()).unwrap(),
        "[run]\nseed = 1\n"
    );

    let mut sampling = ChaCha8Rng::seed_from_u64(11);
    let _: u64 = sampling.gen(); // advance so the saved position is not the seed's start
    let mut state = TrainerState::new(7, cursor());
    state.rngs.insert("sampling".into(), sampling.clone());
    state
        .set_section("reward_means", &vec![0.25f64, 0.5])
        .unwrap();
    let weight = Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let tensors = vec![("mlp1.0.weight".to_string(), weight.clone())];
    let dir = run
        .write_checkpoint(7, 2, |dir| {
            r1v2_actors::model::weights::save(dir, &tensors, DType::F32, usize::MAX)?;
            state.save(dir)
        })
        .unwrap();

    let loaded = TrainerState::load(&dir).unwrap();
    assert_eq!(loaded, state);
    assert_eq!(loaded.data_cursor, cursor());
    let means: Vec<f64> = loaded.section("reward_means").unwrap().unwrap();
    assert_eq!(means, [0.25, 0.5]);
    assert_eq!(loaded.section::<u32>("absent").unwrap(), None);
    assert!(loaded.section::<String>("reward_means").is_err());
    // The restored stream continues where the saved one stood.
    let mut restored = loaded.rngs["sampling"].clone();
    assert_eq!(restored.gen::<u64>(), sampling.gen::<u64>());

    let model =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let read = model["mlp1.0.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(read, [0., 1., 2., 3., 4., 5.]);
}

#[test]
fn corrupt_trainer_state_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join(TRAINER_STATE_FILE), "{\"step\": 1").unwrap();
    let err = TrainerState::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains(TRAINER_STATE_FILE), "{err}");
    assert!(RunDir::open(tmp.path().join("nope")).is_err());
}
