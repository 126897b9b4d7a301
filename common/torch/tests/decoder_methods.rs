//! Every aggregation method works on a decoder's adapters unchanged: two devices of different
//! ranks fine-tune the tiny Llama's q_proj and v_proj on headline examples, each method merges
//! their updates, and the merged global adapter runs in the decoder and moved off the initial one.
//! FLoRA's global carries a dense ΔW per adapted projection: its size is reported.

use flotilla_data::headline::HeadlineExample;
use flotilla_merge::method::Method;
use flotilla_torch::aggregate::{ClientUpdate, MethodExt};
use flotilla_torch::data::decoder_tokenizer::{sequences_dataset, DecoderTokenizer};
use flotilla_torch::gguf::{tiny::tiny_llama, GgufFile, TensorType};
use flotilla_torch::model::decoder_model::DecoderModel;
use flotilla_torch::model::llama::{decoder_spec, load_base};
use flotilla_torch::model::{Architecture, ArchitectureExt};
use flotilla_wire::protocol::TrainingSettings;
use tch::{Device, Tensor};

#[test]
fn every_method_merges_decoder_updates_of_different_ranks() {
    let file = GgufFile::from_bytes(Box::new(tiny_llama(7, TensorType::Q8_0))).unwrap();
    let (llama, base) = load_base(&file).unwrap();
    let tokenizer = DecoderTokenizer::from_gguf(&file).unwrap();
    let spec = decoder_spec(&llama, vec!["q_proj".into(), "v_proj".into()], 160, vec!["news".into()]);
    let articles: Vec<HeadlineExample> = (0..4)
        .map(|i| HeadlineExample {
            key: format!("news/{i}.txt"),
            headline: format!("Team {i} wins"),
            body: format!("The team numbered {i} won its match on Sunday by two goals."),
            label: 0,
        })
        .collect();
    let sequences: Vec<_> = articles.iter().map(|a| tokenizer.headline_example(a, 160).unwrap()).collect();
    let data = sequences_dataset(&sequences, &[0, 0, 0, 0]);
    let architecture = Architecture::Llama(spec);
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
        let mut model = DecoderModel::new(&architecture, &base, &slice, scale, Device::Cpu).unwrap();
        model.train_steps(&data, &settings).unwrap();
        model.adapter().unwrap()
    };
    let (small, large) = (train(2), train(max_rank));
    let input = Tensor::from_slice(&sequences[0].ids).view([1, sequences[0].ids.len() as i64]);
    let logits_of = |adapter: &flotilla_torch::adapter::Adapter| -> Tensor {
        let model = DecoderModel::new(&architecture, &base, adapter, scale, Device::Cpu).unwrap();
        tch::no_grad(|| model.logits(&input)).unwrap()
    };
    let before = logits_of(&global);
    for method in Method::ALL {
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
        let logits = logits_of(&merged);
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{method}");
        let moved = (&logits - &before).abs().max().double_value(&[]);
        assert!(moved > 1e-5, "{method}: the merged model equals the initial one");
        let dense: usize = merged.merged_delta_names().count();
        if method == Method::Flora {
            assert_eq!(dense, architecture.adapted_layers().len(), "FLoRA sends a dense ΔW per projection");
        }
    }
}
