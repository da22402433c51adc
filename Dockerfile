# pipetrain on a CUDA PyTorch base image.
#   docker build -t pipetrain .
#   docker run --gpus all --rm -v $PWD/runs:/app/runs pipetrain schedule=1f1b pipeline.num_microbatches=8
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipetrain ./pipetrain
COPY conf ./conf
# The base image's torch satisfies pipetrain's torch range; only the rest is installed.
RUN pip install --no-cache-dir -e . && python -c "import pipetrain.train"

ENTRYPOINT ["python", "-m", "pipetrain.train"]
