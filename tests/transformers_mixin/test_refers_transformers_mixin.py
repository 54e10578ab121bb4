"""transformers' common tests for every class, written as transformers writes them for ViT, ViT-MAE and CLIP
(tests/models/{vit,vit_mae,clip}/test_modeling_*.py): a `*ModelTester` building a tiny config and inputs, and a
`unittest.TestCase` mixing in `ModelTesterMixin` (and `BackboneTesterMixin` for the backbone). Where a contract does
not apply, the test is overridden with the reason, as transformers' own ViT / ResNet / ViT-MAE tests do.

Collected only with `TRANSFORMERS_TESTS_DIR` set (see conftest.py).
"""

import unittest
from unittest import mock

import torch
from torch import nn
from transformers_tests.test_backbone_common import BackboneTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

from modeling_refers import (
    JoImTeRNetConfig,
    JoImTeRNetForPreTraining,
    MRMConfig,
    MRMForPreTraining,
    RadTexConfig,
    RadTexForPreTraining,
    RefersBackbone,
    RefersConfig,
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
)

VOCAB = 64
TEXT = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=VOCAB)
FLAT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)


class RefersModelTester:
    """As transformers' `ViTModelTester`: a 32 x 32 image in 8 x 8 patches (seq_length 1 + 16), 2 layers of width 32;
    the report encoder (BERT) and decoder at width 24 / 32, reports of 7 tokens. `kind`: "vision" (pixel_values only),
    "report" (with input_ids, attention_mask), "pretraining" (and labels)."""

    def __init__(self, parent, config_class=RefersConfig, kind="vision", batch_size=2, **config_overrides):
        self.parent = parent
        self.config_class, self.kind, self.config_overrides = config_class, kind, config_overrides
        self.batch_size, self.num_channels, self.is_training = batch_size, 3, True
        self.image_size, self.patch_size = FLAT["image_size"], FLAT["patch_size"]
        self.hidden_size, self.num_hidden_layers = FLAT["hidden_size"], FLAT["num_hidden_layers"]
        self.num_attention_heads, self.intermediate_size = FLAT["num_attention_heads"], FLAT["intermediate_size"]
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.seq_length = 1 + self.num_patches  # the aggregation ([CLS]) token + patches, as ViT
        self.report_length = 7

    def get_config(self):
        values = dict(FLAT, text_config=TEXT, view_fusion_hidden_size=16, decoder_hidden_size=32,
                      decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=64,
                      max_report_length=16, decoder_vocab_size=VOCAB, use_view_fusion=False, bos_token_id=2,
                      eos_token_id=3, pad_token_id=0)
        values.update(self.config_overrides)
        return self.config_class(**values)

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        input_ids = ids_tensor([self.batch_size, self.report_length], VOCAB - 5) + 5  # above the special tokens
        input_ids[:, 0] = 2  # [CLS] / bos
        return self.get_config(), pixel_values, input_ids

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, input_ids = self.prepare_config_and_inputs()
        inputs_dict = {"pixel_values": pixel_values}
        if self.kind != "vision":
            inputs_dict.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        if self.kind == "pretraining":
            inputs_dict["labels"] = input_ids.clone()
        return config, inputs_dict


class RefersTestBase(ModelTesterMixin):
    """What every class here shares with transformers' ViT test (tests/models/vit/test_modeling_vit.py)."""

    test_resize_embeddings = False  # as ViT: the patch embedding is no token vocabulary
    config_class = RefersConfig

    def setUp(self):
        self.config_tester = ConfigTester(self, config_class=self.config_class, has_text_modality=False, **FLAT)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="As ViT: the radiograph transformer does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="As ViT: the radiograph transformer does not use inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    def test_model_get_set_embeddings(self):
        # as ViT's override: the input embedding is the patch embedding (a Conv2d module, no nn.Embedding), and there
        # is no output embedding to tie
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, nn.Linear))


class RefersModelTest(RefersTestBase, unittest.TestCase):
    """RefersModel and RefersForImageClassification, as ViTModel / ViTForImageClassification."""

    all_model_classes = (RefersModel, RefersForImageClassification)

    def setUp(self):
        self.model_tester = RefersModelTester(self)
        super().setUp()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # transformers adds labels by its own mapping names (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES), where a
        # remote-code class is not listed: the classifier's labels here, as that mapping would give them
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is RefersForImageClassification:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    def _with_loss_only(self, test):
        # transformers' test_training* skip base models by name (MODEL_MAPPING_NAMES, which lists ViTModel but no
        # remote-code class): RefersModel has no loss to train, as ViTModel; the classifier is trained
        with mock.patch.object(self, "all_model_classes", (RefersForImageClassification,)):
            test()

    def test_training(self):
        self._with_loss_only(super().test_training)

    def test_training_gradient_checkpointing(self):
        self._with_loss_only(super().test_training_gradient_checkpointing)

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        self._with_loss_only(super().test_training_gradient_checkpointing_use_reentrant_false)

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        self._with_loss_only(super().test_training_gradient_checkpointing_use_reentrant_true)


class RefersForPreTrainingTest(RefersTestBase, unittest.TestCase):
    """RefersForPreTraining: report generation + study-report consistency (as CLIP: two encoders, and a decoder)."""

    all_model_classes = (RefersForPreTraining,)

    def setUp(self):
        self.model_tester = RefersModelTester(self, kind="pretraining")
        # as CLIP's: with output_hidden_states, three encoders' hidden states come after the attentions (the radiograph
        # transformer's, the report decoder's `decoder_hidden_states`, the report encoder's `text_hidden_states`)
        self.model_tester.num_hidden_states_types = 3
        super().setUp()


class MRMForPreTrainingTest(RefersTestBase, unittest.TestCase):
    """MRMForPreTraining, as ViTMAEForPreTraining: deterministic through ViT-MAE's `noise` input; the encoder sees the
    visible patches only (seq_length 1 + 4 at mask ratio 0.75)."""

    all_model_classes = (MRMForPreTraining,)
    config_class = MRMConfig

    def setUp(self):
        self.model_tester = RefersModelTester(
            self, MRMConfig, kind="pretraining", mrm_decoder_hidden_size=16, mrm_decoder_num_hidden_layers=1,
            mrm_decoder_num_attention_heads=2, mrm_decoder_intermediate_size=32)
        self.model_tester.seq_length = 1 + int(self.model_tester.num_patches * (1 - 0.75))
        super().setUp()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # as transformers' ViT-MAE test: the same noise every call, so that two forwards mask the same patches (one
        # row per image: the batch the test passes, 7 in the SDPA comparison)
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        generator = torch.Generator().manual_seed(2)
        pixel_values = inputs_dict["pixel_values"]
        inputs_dict["noise"] = torch.rand(pixel_values.shape[0], self.model_tester.num_patches,
                                          generator=generator).to(pixel_values.device)
        return inputs_dict


class JoImTeRNetForPreTrainingTest(RefersTestBase, unittest.TestCase):
    """JoImTeRNetForPreTraining: view fusion, regions and words matched in a 16-d space (as CLIP)."""

    all_model_classes = (JoImTeRNetForPreTraining,)
    config_class = JoImTeRNetConfig
    additional_model_inputs = ["input_ids", "attention_mask"]  # as CLIP's "pixel_values": both encoders run

    def setUp(self):
        self.model_tester = RefersModelTester(self, JoImTeRNetConfig, kind="report", use_view_fusion=True,
                                              num_views=1, projection_dim=16)
        # as CLIP's: the radiograph transformer's and the report encoder's (`text_hidden_states`) hidden states
        self.model_tester.num_hidden_states_types = 2
        super().setUp()


class RadTexForPreTrainingTest(RefersTestBase, unittest.TestCase):
    """RadTexForPreTraining: timm's tiny `test_resnet` (373k parameters, 96 channels; 64 x 64 images) and the report
    decoder, as transformers' ResNet test for the CNN's hidden states."""

    all_model_classes = (RadTexForPreTraining,)
    config_class = RadTexConfig
    # as ResNet's test: the CNN view encoder has no attention (`attentions` is empty); the report decoder's are
    # `decoder_attentions` / `cross_attentions`, checked by tests/test_common_model_contracts.py
    has_attentions = False

    def setUp(self):
        self.model_tester = RefersModelTester(self, RadTexConfig, kind="pretraining", backbone="test_resnet",
                                              hidden_size=96, image_size=64)
        self.model_tester.image_size = 64
        super().setUp()

    def test_hidden_states_output(self):
        # as transformers' ResNet test: a CNN's hidden states are the stem's and each stage's feature maps (no
        # sequence of tokens), each smaller than the one before
        import timm

        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        cnn = timm.create_model(config.backbone, pretrained=False, num_classes=0, global_pool="")
        levels = cnn.forward_intermediates(torch.zeros(1, 3, config.image_size, config.image_size))[1]
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs_dict, model_class), output_hidden_states=True)
            self.assertEqual(len(outputs.hidden_states), len(levels))
            for hidden, level in zip(outputs.hidden_states, levels):
                self.assertEqual(tuple(hidden.shape[1:]), tuple(level.shape[1:]))


class RefersBackboneModelTester(RefersModelTester):
    def get_config(self):
        return RefersConfig(**FLAT, out_features=["stage1", "stage2"])


class RefersBackboneTest(BackboneTesterMixin, unittest.TestCase):
    """RefersBackbone, as transformers' Dinov2Backbone / ViTDetBackbone tests."""

    all_model_classes = (RefersBackbone,)
    config_class = RefersConfig
    has_attentions = False  # as Dinov2Backbone's test: the backbone returns feature maps

    def setUp(self):
        self.model_tester = RefersBackboneModelTester(self)

    def test_config(self):
        # transformers' test expects `config_class()` to carry the last stage as out_features (Dinov2Config sets it at
        # init). RefersConfig is the whole model's configuration (every REFERS folder's): it keeps out_features None
        # until given, so that a later num_hidden_layers change leaves no stale stage, and RefersBackbone takes the
        # last stage then (checked here); transformers' test then runs on configs given the same default
        config = RefersConfig(**FLAT)
        self.assertIsNone(config.out_features)
        backbone = RefersBackbone(config)
        self.assertEqual((backbone.out_features, backbone.out_indices), (["stage2"], [2]))

        def config_with_the_backbone_default(**kwargs):
            config = RefersConfig(**kwargs)
            if config.out_features is None:
                config.set_output_features_output_indices(out_features=None, out_indices=None)
            return config

        with mock.patch.object(self, "config_class", config_with_the_backbone_default):
            super().test_config()
