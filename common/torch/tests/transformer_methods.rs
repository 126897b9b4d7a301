//! Every aggregation method works on a transformer's adapters unchanged: two devices of different
//! ranks fine-tune the tiny BERT fixture's query and value modules on token data, each method merges
//! their updates, and the merged global adapter runs in the model and moved off the initial one.

use std::path::Path;

use flotilla_merge::method::Method;
use flotilla_torch::aggregate::{ClientUpdate, MethodExt};
use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::model::checkpoint::{FineTuning, HfCheckpoint};
use flotilla_torch::model::{Architecture, ArchitectureExt, LoraModel, Pooling};
use flotilla_wire::protocol::TrainingSettings;
use tch::Device;

#[test]
fn every_method_merges_transformer_updates_of_different_ranks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert");
    let checkpoint = HfCheckpoint::open(&dir).unwrap();
    let spec = checkpoint
        .spec(&FineTuning {
            target_modules: vec!["query".into(), "value".into()],
            pooling: Pooling::Cls,
            labels: vec!["food".into(), "animals".into()],
            max_length: 16,
        })
        .unwrap();
    let base = checkpoint.load_weights(&spec).unwrap();
    let tokenizer = TextTokenizer::from_file(&checkpoint.tokenizer_path(), 16, spec.vocab as usize).unwrap();
    let texts = ["a man is eating food", "the lazy dog", "cafe prices rose", "the quick brown fox jumps"];
    let data = tokenizer.dataset(&texts, &[0, 1, 0, 1]).unwrap();
    let architecture = Architecture::Bert(spec);
    let (max_rank, scale) = (4, 2.0);
    let global = architecture.init_adapter(max_rank, 1).unwrap();
    let settings = TrainingSettings {
        local_steps: 5,
        local_epochs: 0,
        batch_size: 4,
        learning_rate: 0.01,
        seed: 2,
        trainable: Default::default(),
    };
    let train = |rank: usize| {
        let slice = global.slice_to_rank(rank).unwrap();
        let mut model = LoraModel::new(&architecture, &base, &slice, scale, Device::Cpu).unwrap();
        model.train_steps(&data, &settings).unwrap();
        model.adapter().unwrap()
    };
    let (small, large) = (train(2), train(max_rank));
    let before = LoraModel::new(&architecture, &base, &global, scale, Device::Cpu)
        .unwrap()
        .forward(&data.features, data.lengths.as_ref())
        .unwrap();
    for method in Method::ALL {
        // FedAvg averages adapters of one rank: give it two of R_max.
        let clients = if method == Method::FedAvg { [&large, &large] } else { [&small, &large] };
        let mut accumulator = method.start_online(&global, scale, 7).unwrap();
        for (i, adapter) in clients.iter().enumerate() {
            let update = ClientUpdate {
                client: if i == 0 { "a" } else { "b" },
                declared_rank: adapter.rank(),
                num_samples: 10 + i as u64,
                scale,
                adapter,
            };
            accumulator.fold(&update).unwrap_or_else(|e| panic!("{method}: {e}"));
        }
        let merged = accumulator.finish().unwrap_or_else(|e| panic!("{method}: {e}")).adapter;
        assert_eq!(merged.rank(), max_rank, "{method}");
        let model = LoraModel::new(&architecture, &base, &merged, scale, Device::Cpu).unwrap();
        let logits = model.forward(&data.features, data.lengths.as_ref()).unwrap();
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{method}");
        let moved = (&logits - &before).abs().max().double_value(&[]);
        assert!(moved > 1e-4, "{method}: the merged model equals the initial one");
    }
}
