use super::*;
use crate::data::synthetic_classification;
use flotilla_wire::protocol::TrainingSettings;

fn arch() -> Architecture {
    Architecture::Mlp { input: 16, hidden: vec![32, 32], classes: 4 }
}

#[test]
fn a_fresh_adapter_leaves_the_base_unchanged_and_training_improves_it() {
    let arch = arch();
    let base = arch.init_base(1);
    let global = arch.init_adapter(8, 2).unwrap();
    assert_eq!(global.rank(), 8);
    let slice = global.slice_to_rank(4).unwrap();
    let mut model = LoraModel::new(&arch, &base, &slice, 2.0, Device::Cpu).unwrap();
    let data = synthetic_classification(512, 16, 4, 3, 4);
    let settings = TrainingSettings {
        local_steps: 150,
        local_epochs: 0,
        batch_size: 32,
        learning_rate: 1e-2,
        seed: 5,
        trainable: Default::default(),
    };
    let metrics = model.train(&data, &settings).unwrap();
    assert!(metrics.loss_after < metrics.loss_before * 0.8, "{metrics:?}");
    let trained = model.adapter().unwrap();
    assert_eq!(trained.rank(), 4);
    // B starts at zero, so it must have moved; the base never changes.
    let (_, b) = trained.factors(&format!("{ADAPTER_PREFIX}fc1"));
    assert!(b.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn a_merged_delta_joins_the_frozen_weight_in_training_evaluation_and_merging() {
    let arch = arch();
    let base = arch.init_base(1);
    let global = arch.init_adapter(8, 2).unwrap();
    let x = synthetic_classification(64, 16, 4, 3, 4).features;
    let without = LoraModel::new(&arch, &base, &global, 2.0, Device::Cpu).unwrap().forward(&x, None).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = global.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let module = format!("{ADAPTER_PREFIX}fc1");
    tensors.insert(crate::adapter::merged_delta_name(&module), crate::data::seeded_uniform(&[32, 16], 0.5, 9));
    let with_delta = Adapter::new(tensors).unwrap();
    let model = LoraModel::new(&arch, &base, &with_delta.slice_to_rank(2).unwrap(), 2.0, Device::Cpu).unwrap();
    let logits = model.forward(&x, None).unwrap();
    assert!((&logits - &without).abs().max().double_value(&[]) > 1e-3, "ΔW changes the model");
    let merged = arch.merge(&base, &with_delta, 2.0).unwrap();
    let plain = arch.forward_merged(&merged, &x, None).unwrap();
    assert!((&logits - &plain).abs().max().double_value(&[]) < 1e-5, "merging keeps ΔW");
    // The trained adapter a device sends back has no ΔW.
    assert_eq!(model.adapter().unwrap().merged_delta_names().count(), 0);
}

#[test]
fn pretraining_learns_and_a_merged_model_computes_what_base_plus_adapter_computes() {
    let arch = arch();
    let data = synthetic_classification(512, 16, 4, 3, 4);
    let base = arch.init_base(1);
    let initial = arch.init_adapter(8, 2).unwrap();
    let head =
        (initial.get("base_model.model.head.weight").unwrap(), initial.get("base_model.model.head.bias").unwrap());
    let settings = PretrainSettings { steps: 200, batch_size: 32, learning_rate: 1e-2, seed: 3 };
    let (pretrained, head_w, head_b) = arch.pretrain(&base, head, &data, &settings).unwrap();
    let adapter = with_head(&arch, &initial, &head_w, &head_b).unwrap();
    let before = LoraModel::new(&arch, &base, &initial, 1.0, Device::Cpu).unwrap().evaluate(&data, 256).unwrap();
    let after = LoraModel::new(&arch, &pretrained, &adapter, 1.0, Device::Cpu).unwrap().evaluate(&data, 256).unwrap();
    assert!(after.1 > before.1 + 0.2, "accuracy {before:?} -> {after:?}");
    let (again, _, _) = arch.pretrain(&base, head, &data, &settings).unwrap();
    assert!(again.iter().all(|(n, t)| t.equal(&pretrained[n])), "pretraining is deterministic");

    // Train an adapter, merge it, and compare the plain MLP with base + LoRA.
    let mut model = LoraModel::new(&arch, &pretrained, &adapter, 2.0, Device::Cpu).unwrap();
    model
        .train_steps(
            &data,
            &TrainingSettings {
                local_steps: 50,
                local_epochs: 0,
                batch_size: 32,
                learning_rate: 1e-2,
                seed: 5,
                trainable: Default::default(),
            },
        )
        .unwrap();
    let trained = model.adapter().unwrap();
    let merged = arch.merge(&pretrained, &trained, 2.0).unwrap();
    let lora =
        LoraModel::new(&arch, &pretrained, &trained, 2.0, Device::Cpu).unwrap().forward(&data.features, None).unwrap();
    let plain = arch.forward_merged(&merged, &data.features, None).unwrap();
    let diff = (lora - plain).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max difference {diff}");
}

#[test]
fn training_is_deterministic_given_the_seed() {
    let arch = arch();
    let base = arch.init_base(1);
    let global = arch.init_adapter(4, 2).unwrap();
    let data = synthetic_classification(128, 16, 4, 3, 4);
    let settings = TrainingSettings {
        local_steps: 10,
        local_epochs: 0,
        batch_size: 16,
        learning_rate: 1e-2,
        seed: 9,
        trainable: Default::default(),
    };
    let run = || {
        let mut m = LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).unwrap();
        m.train(&data, &settings).unwrap();
        m.adapter().unwrap()
    };
    let (x, y) = (run(), run());
    for (name, t) in x.tensors() {
        assert!(t.equal(y.get(name).unwrap()), "{name}");
    }
}

#[test]
fn lora_training_on_fashion_mnist_improves_held_out_accuracy() {
    use crate::data::idx::{load_split, Split, DEBIAN_FASHION_MNIST};
    let dir = std::env::var_os("FLOTILLA_FASHION_MNIST")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| DEBIAN_FASHION_MNIST.into());
    let train = load_split(&dir, Split::Train, 10).expect("Fashion-MNIST (bash deploy/test.sh installs it)");
    let test = load_split(&dir, Split::Test, 10).expect("Fashion-MNIST");
    let local = train.subset(&(0..6000).collect::<Vec<_>>());
    let held_out = test.subset(&(0..2000).collect::<Vec<_>>());
    let arch = Architecture::Mlp { input: 784, hidden: vec![128], classes: 10 };
    let base = arch.init_base(1);
    let global = arch.init_adapter(8, 2).unwrap();
    let mut model = LoraModel::new(&arch, &base, &global, 2.0, Device::Cpu).unwrap();
    let (_, before) = model.evaluate(&held_out, 1000).unwrap();
    let settings = TrainingSettings {
        local_steps: 300,
        local_epochs: 0,
        batch_size: 64,
        learning_rate: 5e-3,
        seed: 3,
        trainable: Default::default(),
    };
    model.train(&local, &settings).unwrap();
    let (_, after) = model.evaluate(&held_out, 1000).unwrap();
    assert!(before < 0.25 && after > 0.70, "held-out accuracy {before:.3} → {after:.3}");
}

fn cnn() -> Architecture {
    Architecture::Cnn { side: 28, channels: 1, conv: vec![8, 16], hidden: 64, classes: 10 }
}

#[test]
fn a_cnn_has_lora_on_its_convolutions_and_its_merged_form_computes_the_same() {
    let arch = cnn();
    arch.validate().unwrap();
    let layers = arch.adapted_layers();
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1"]);
    assert_eq!(layers[1].kind, LayerKind::Conv { c_in: 8, c_out: 16, kernel: 3 });
    assert_eq!((layers[1].d_in, layers[1].d_out), (8 * 9, 16));
    assert_eq!(layers[2].d_in, 16 * 7 * 7, "two 2×2 pools take 28 to 7");
    let base = arch.init_base(1);
    assert_eq!(base["conv1.weight"].size(), [8, 1, 3, 3]);
    let adapter = arch.init_adapter(4, 2).unwrap();
    assert_eq!(adapter.get("base_model.model.conv2.lora_A.weight").unwrap().size(), [4, 72]);
    // Train a little so that B is not zero, then compare LoRA and merged forwards.
    let data = synthetic_classification(256, 784, 10, 3, 4);
    let mut model = LoraModel::new(&arch, &base, &adapter, 2.0, Device::Cpu).unwrap();
    model
        .train_steps(
            &data,
            &TrainingSettings {
                local_steps: 20,
                local_epochs: 0,
                batch_size: 32,
                learning_rate: 1e-2,
                seed: 5,
                trainable: Default::default(),
            },
        )
        .unwrap();
    let trained = model.adapter().unwrap();
    let (_, b) = trained.factors("base_model.model.conv1");
    assert!(b.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the conv LoRA trained");
    let merged = arch.merge(&base, &trained, 2.0).unwrap();
    let x = data.features.narrow(0, 0, 16);
    let lora = LoraModel::new(&arch, &base, &trained, 2.0, Device::Cpu).unwrap().forward(&x, None).unwrap();
    let plain = arch.forward_merged(&merged, &x, None).unwrap();
    let diff = (lora - plain).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max difference {diff}");
    // A rank-2 slice runs too (what a phone gets).
    let slice = trained.slice_to_rank(2).unwrap();
    assert_eq!(
        LoraModel::new(&arch, &base, &slice, 2.0, Device::Cpu).unwrap().forward(&x, None).unwrap().size(),
        [16, 10]
    );
    let tiny = Architecture::Cnn { side: 2, channels: 1, conv: vec![4, 4], hidden: 8, classes: 2 };
    assert!(tiny.validate().unwrap_err().contains("does not survive"));
}

#[test]
fn cnn_lora_training_on_fashion_mnist_improves_held_out_accuracy() {
    use crate::data::idx::{load_split, Split, DEBIAN_FASHION_MNIST};
    let dir = std::env::var_os("FLOTILLA_FASHION_MNIST")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| DEBIAN_FASHION_MNIST.into());
    let train = load_split(&dir, Split::Train, 10).expect("Fashion-MNIST (bash deploy/test.sh installs it)");
    let test = load_split(&dir, Split::Test, 10).expect("Fashion-MNIST");
    let local = train.subset(&(0..4000).collect::<Vec<_>>());
    let held_out = test.subset(&(0..1000).collect::<Vec<_>>());
    let arch = cnn();
    let base = arch.init_base(1);
    let global = arch.init_adapter(8, 2).unwrap();
    let mut model = LoraModel::new(&arch, &base, &global, 2.0, Device::Cpu).unwrap();
    let (_, before) = model.evaluate(&held_out, 500).unwrap();
    let settings = TrainingSettings {
        local_steps: 150,
        local_epochs: 0,
        batch_size: 32,
        learning_rate: 5e-3,
        seed: 3,
        trainable: Default::default(),
    };
    model.train(&local, &settings).unwrap();
    let (_, after) = model.evaluate(&held_out, 500).unwrap();
    assert!(before < 0.25 && after > 0.5, "held-out accuracy {before:.3} → {after:.3}");
}

#[test]
fn under_b_only_every_a_comes_back_bit_for_bit_and_b_and_the_head_train() {
    let arch = arch();
    let base = arch.init_base(1);
    let global = arch.init_adapter(4, 2).unwrap();
    let data = synthetic_classification(100, 16, 4, 3, 4);
    let mut model = LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).unwrap();
    let settings = TrainingSettings {
        local_steps: 20,
        local_epochs: 0,
        batch_size: 32,
        learning_rate: 1e-2,
        seed: 7,
        trainable: flotilla_wire::model::Trainable::BOnly,
    };
    model.train(&data, &settings).unwrap();
    let trained = model.adapter().unwrap();
    for (name, t) in global.tensors() {
        let moved = !trained.get(name).unwrap().equal(t);
        let frozen = matches!(crate::adapter::tensor_role(name), crate::adapter::TensorRole::LoraA(_));
        assert_eq!(moved, !frozen, "{name}: moved {moved}");
    }
}

#[test]
fn local_epochs_are_passes_over_the_local_data() {
    let arch = arch();
    let base = arch.init_base(1);
    let global = arch.init_adapter(4, 2).unwrap();
    let data = synthetic_classification(100, 16, 4, 3, 4);
    let train = |local_steps, local_epochs| {
        let mut model = LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).unwrap();
        let settings = TrainingSettings {
            local_steps,
            local_epochs,
            batch_size: 32,
            learning_rate: 1e-2,
            seed: 7,
            trainable: Default::default(),
        };
        model.train_steps(&data, &settings).unwrap();
        model.adapter().unwrap()
    };
    // 2 epochs of ⌈100 / 32⌉ = 4 steps: the same 8 steps, whatever local_steps says.
    let by_epochs = train(1, 2);
    let by_steps = train(8, 0);
    assert!(by_epochs.tensors().iter().all(|(n, t)| t.equal(by_steps.get(n).unwrap())));
    let fewer = train(7, 0);
    assert!(!by_epochs.tensors().iter().all(|(n, t)| t.equal(fewer.get(n).unwrap())));
}

#[test]
fn a_base_with_wrong_shapes_is_refused() {
    let arch = arch();
    let mut base = arch.init_base(1);
    base.insert("fc1.weight".into(), Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)));
    let global = arch.init_adapter(4, 2).unwrap();
    assert!(LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).is_err());
}

#[test]
fn full_fine_tuning_starts_as_the_plain_model_and_trains_every_weight() {
    let arch = arch();
    let base = arch.init_base(1);
    let initial = arch.init_adapter(4, 2).unwrap();
    let head =
        (initial.get("base_model.model.head.weight").unwrap(), initial.get("base_model.model.head.bias").unwrap());
    let data = synthetic_classification(512, 16, 4, 3, 4);
    let mut model = FullModel::new(&arch, &base, head, Device::Cpu).unwrap();
    // Before training it is the base with its head: what a zero-B adapter gives.
    let lora = LoraModel::new(&arch, &base, &initial, 2.0, Device::Cpu).unwrap();
    let gap = (model.forward(&data.features, None).unwrap() - lora.forward(&data.features, None).unwrap())
        .abs()
        .max()
        .double_value(&[]);
    assert!(gap < 1e-6, "{gap}");
    let weights: i64 = base.values().map(|t| t.numel() as i64).sum::<i64>() + 4 * 32 + 4;
    assert_eq!(model.trainable_parameters(), weights);
    let before = model.evaluate(&data, 256).unwrap();
    let settings = TrainingSettings {
        local_steps: 150,
        local_epochs: 0,
        batch_size: 32,
        learning_rate: 1e-2,
        seed: 5,
        trainable: Default::default(),
    };
    model.train_steps(&data, &settings).unwrap();
    let after = model.evaluate(&data, 256).unwrap();
    assert!(after.0 < before.0 * 0.8 && after.1 > before.1 + 0.2, "{before:?} -> {after:?}");
    // The inputs are copies: the caller's base is untouched.
    assert!(base.iter().all(|(n, t)| t.equal(&arch.init_base(1)[n])));
}

#[test]
fn full_fine_tuning_of_a_transformer_moves_the_encoder_and_learns() {
    let spec = BertSpec {
        layers: 1,
        hidden: 16,
        heads: 2,
        intermediate: 32,
        vocab: 50,
        max_positions: 16,
        type_vocab: 2,
        layer_norm_eps: 1e-12,
        activation: Activation::Gelu,
        pooling: Pooling::Mean,
        target_modules: vec!["query".into(), "value".into()],
        labels: vec!["low".into(), "high".into()],
        max_length: 8,
    };
    let arch = Architecture::Bert(spec);
    let base = arch.init_base(3);
    let initial = arch.init_adapter(2, 4).unwrap();
    let (head_weight, head_bias) = arch.head_names().unwrap();
    let head = (initial.get(&head_weight).unwrap(), initial.get(&head_bias).unwrap());
    // Class c's texts use tokens from its own half of the vocabulary.
    let n = 256;
    let labels = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
    let offsets = (&labels * 25).unsqueeze(1);
    let tokens: Vec<i64> = (0..n * 8).map(|k| 1 + (k * 7 + k / 8 * 3) % 24).collect();
    let ids = Tensor::from_slice(&tokens).view([n, 8]) + offsets;
    let lengths = Tensor::from_slice(&(0..n).map(|i| 4 + i % 5).collect::<Vec<i64>>());
    let data = Dataset::tokens(ids, lengths, labels);
    let mut model = FullModel::new(&arch, &base, head, Device::Cpu).unwrap();
    let before = model.evaluate(&data, 64).unwrap();
    let settings = TrainingSettings {
        local_steps: 60,
        local_epochs: 0,
        batch_size: 16,
        learning_rate: 3e-3,
        seed: 1,
        trainable: Default::default(),
    };
    model.train_steps(&data, &settings).unwrap();
    let after = model.evaluate(&data, 64).unwrap();
    assert!(after.1 > 0.9 && after.0 < before.0, "{before:?} -> {after:?}");
    let total: i64 = base.values().map(|t| t.numel() as i64).sum::<i64>() + 2 * 16 + 2;
    assert_eq!(model.trainable_parameters(), total);
    // Not only the head: the encoder's own weights moved.
    let trained = model.base_weights().unwrap();
    for name in ["encoder.layer.0.attention.self.key.weight", "embeddings.word_embeddings.weight"] {
        let moved = (&trained[name] - &base[name]).abs().max().double_value(&[]);
        assert!(moved > 1e-4, "{name} moved {moved}");
    }
}
