"""refers: REFERS (Zhou et al., Nature Machine Intelligence 2022) for the Hugging Face ecosystem."""

from setuptools import find_packages, setup

DOWNSTREAM = ["grad-cam>=1.5.4", "pycocoevalcap>=1.2", "rouge-score>=0.1.2", "sacrebleu>=2.4"]

setup(
    name="refers",
    version="0.1.0",
    description="REFERS radiograph transformers: report-supervised pretraining and label-efficient fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # sample_data/ (the small real sample in the layout of ../shared/data, 7 MB) ships inside the package as
    # datasets_scripts/sample_data, so the scripts' default --data_dir exists after a plain `pip install .` too;
    # datasets_scripts.SAMPLE_DATA_DIR finds it there, or beside the package in a source checkout.
    packages=[*find_packages(include=["modeling_refers", "modeling_refers.*", "datasets_scripts", "datasets_scripts.*"]),
              "datasets_scripts.sample_data"],
    package_dir={"datasets_scripts.sample_data": "sample_data"},
    # the bundled `evaluate` module (modeling_refers/metrics/multilabel_auc/) and the model card's Jinja template
    package_data={"modeling_refers.metrics": ["multilabel_auc/*.py", "multilabel_auc/README.md"],
                  "modeling_refers.hub": ["model_card_template.md"],
                  "datasets_scripts.sample_data": ["**/*"]},
    exclude_package_data={"datasets_scripts.sample_data": ["**/__pycache__/*", "**/*.pyc"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.23,<6",
        "datasets>=5.2,<6",
        "evaluate>=0.4.6",
        "accelerate>=1.15",
        "huggingface-hub>=2.4",
        "jinja2>=3.1",  # huggingface_hub's ModelCard.from_template renders the model card template
        "safetensors>=0.8",
        "timm>=1.0.31",
        "tokenizers>=0.23",
        "scikit-learn>=1.9",
        "scipy>=1.11",
        "matplotlib>=3.11",
        "numpy>=2.0",
        "pandas>=3.0",
        "pillow>=11",
        "pydicom>=3.0",
        "tqdm",
    ],
    extras_require={
        # explanations (Grad-CAM), report-generation metrics; imported lazily, with the pip command in the error
        "downstream": DOWNSTREAM,
        "test": ["pytest>=9", *DOWNSTREAM],
    },
)
