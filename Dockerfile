# pipetrain on a CUDA PyTorch base image.
#   docker build -t pipetrain .
#   docker run --gpus all --rm -v $PWD/runs:/app/runs pipetrain schedule=1f1b pipeline.num_microbatches=8
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# A regular (not editable) install: the configs travel inside the package (pipetrain/conf/). The base
# image's torch satisfies pipetrain's torch range; only the rest is installed. The sources go afterwards,
# so what runs is the installed package.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipetrain ./pipetrain
RUN pip install --no-cache-dir /src && rm -rf /src

WORKDIR /app
RUN python -c "import pipetrain.compose as c; assert (c.CONF_DIR / 'train.yaml').is_file(), c.CONF_DIR"

ENTRYPOINT ["python", "-m", "pipetrain.train"]
