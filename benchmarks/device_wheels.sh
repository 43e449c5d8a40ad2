# Sourced by benchmarks/device_run.sh and device_eval.sh: installs the wheels carried in .whl/
# (packages the GPU machine lacks, such as ml_collections) into /tmp/site, on PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
