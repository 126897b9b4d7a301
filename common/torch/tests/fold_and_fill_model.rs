//! Fold-and-Fill on the model side: a device of rank r receives its slice with the rest of the
//! global adapter folded into its frozen weight. Before training its model computes exactly what
//! the full global adapter computes; training moves only its prefix and the head (the folded tail
//! gets no gradient); and the coordinator's aggregate of a lone device is that device's model.

use flotilla_merge::method::Method;
use flotilla_torch::adapter::Adapter;
use flotilla_torch::aggregate::{ClientUpdate, MethodExt};
use flotilla_torch::data::synthetic_classification;
use flotilla_torch::model::{Architecture, ArchitectureExt, LoraModel};
use flotilla_wire::protocol::TrainingSettings;
use tch::{Device, Tensor};

const R_MAX: usize = 8;
const SCALE: f64 = 2.0;

fn setup() -> (Architecture, flotilla_torch::model::BaseWeights, Adapter) {
    let architecture = Architecture::Mlp { input: 12, hidden: vec![10, 6], classes: 3 };
    let base = architecture.init_base(1);
    // A trained-looking global adapter: B away from zero.
    let initial = architecture.init_adapter(R_MAX, 2).unwrap();
    let tensors = initial
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), if n.contains("lora_B") { t.rand_like() - 0.5 } else { t.copy() }))
        .collect();
    (architecture, base, Adapter::new(tensors).unwrap())
}

fn forward(
    architecture: &Architecture,
    base: &flotilla_torch::model::BaseWeights,
    adapter: &Adapter,
    x: &Tensor,
) -> Tensor {
    LoraModel::new(architecture, base, adapter, SCALE, Device::Cpu).unwrap().forward(x, None).unwrap()
}

#[test]
fn a_folded_slice_computes_what_the_full_global_adapter_computes() {
    let (architecture, base, global) = setup();
    let x = synthetic_classification(32, 12, 3, 1, 2).features;
    let full = forward(&architecture, &base, &global, &x);
    for rank in [1, 2, 4, R_MAX] {
        let folded = global.slice_with_folded_tail(rank, SCALE).unwrap();
        assert_eq!(folded.rank(), rank);
        let difference = (forward(&architecture, &base, &folded, &x) - &full).abs().max().double_value(&[]);
        assert!(difference < 1e-5, "rank {rank}: {difference}");
        // A plain slice drops the tail, and computes something else.
        let plain = global.slice_to_rank(rank).unwrap();
        let dropped = (forward(&architecture, &base, &plain, &x) - &full).abs().max().double_value(&[]);
        assert!(rank == R_MAX || dropped > 1e-4, "rank {rank}");
    }
}

#[test]
fn training_moves_the_prefix_only_and_a_lone_device_is_what_the_coordinator_rebuilds() {
    let (architecture, base, global) = setup();
    let data = synthetic_classification(64, 12, 3, 1, 3);
    let rank = 2;
    let folded = global.slice_with_folded_tail(rank, SCALE).unwrap();
    let mut model = LoraModel::new(&architecture, &base, &folded, SCALE, Device::Cpu).unwrap();
    let settings = TrainingSettings {
        local_steps: 30,
        local_epochs: 0,
        batch_size: 16,
        learning_rate: 0.05,
        seed: 4,
        trainable: Default::default(),
    };
    model.train_steps(&data, &settings).unwrap();
    let trained = model.adapter().unwrap();
    assert_eq!(trained.rank(), rank);
    assert_eq!(trained.merged_delta_names().count(), 0, "the upload is the prefix and the head, as under RBLA");

    // The trained model is the trained prefix over the original folded tail: the tail did not move.
    let tensors = trained
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.copy()))
        .chain(folded.merged_delta_names().map(|n| (n.to_string(), folded.get(n).unwrap().copy())))
        .collect();
    let rebuilt_locally = Adapter::new(tensors).unwrap();
    let x = &data.features;
    let device_logits = model.forward(x, None).unwrap();
    let difference =
        (forward(&architecture, &base, &rebuilt_locally, x) - &device_logits).abs().max().double_value(&[]);
    assert!(difference < 1e-5, "{difference}");

    // Alone in the round, the device's share is 1 on its slots and 0 beyond them: the new global
    // adapter is exactly its model.
    let mut accumulator = Method::FoldAndFill.start(&global, SCALE).unwrap();
    let update = ClientUpdate { client: "lone", declared_rank: rank, num_samples: 64, scale: SCALE, adapter: &trained };
    accumulator.fold(&update).unwrap();
    let next = accumulator.finish().unwrap().adapter;
    assert_eq!(next.rank(), R_MAX);
    let difference = (forward(&architecture, &base, &next, x) - &device_logits).abs().max().double_value(&[]);
    assert!(difference < 1e-4, "{difference}");
    // And the merged model computes the same.
    let merged = architecture.merge(&base, &next, SCALE).unwrap();
    let plain = architecture.forward_merged(&merged, x, None).unwrap();
    assert!((plain - &device_logits).abs().max().double_value(&[]) < 1e-4);
}
