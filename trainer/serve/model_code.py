"""The registered model, from code (MLflow's models-from-code): loading ``models:/streamret@champion``
runs this file and the packages logged beside it (``code/``), then ``StreamretPyfunc.load_context``
reads the weights with ``weights_only=True``. Nothing is unpickled: the model is not a cloudpickled
instance, so a tampered registry entry cannot execute code through deserialization."""
import mlflow.models

from trainer.serve.pyfunc import StreamretPyfunc

mlflow.models.set_model(StreamretPyfunc())
