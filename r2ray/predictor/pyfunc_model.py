"""MLflow's models-from-code entry for r2ray's pyfunc model: MLflow runs this file (logged with the
model) to build the model object, so nothing is pickled. Not imported by the package; the model
itself is :class:`r2ray.predictor.pyfunc.R2RayPyfunc`."""

import mlflow

from r2ray.predictor.pyfunc import R2RayPyfunc

mlflow.models.set_model(R2RayPyfunc())
