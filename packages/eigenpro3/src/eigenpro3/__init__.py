"""eigenpro3: large kernel models ``f(x) = sum_j alpha_j K(x, z_j)`` trained with EigenPro3.

Public API::

    from eigenpro3 import KernelModel, EigenPro2, kernels, utils, datasets
    model = KernelModel(n_classes, centers, kernels.laplacian, X=X, y=Y)   # or "laplacian"
    history = model.fit(model.train_loaders, val_loader, score_fn=utils.accuracy, epochs=5)
    yhat = model.predict(X_test); model.save("m.pt"); model.load("m.pt")

Submodules: ``kernels`` (laplacian, gaussian, dispersal, ntk_relu), ``models``
(KernelModel), ``eigenpro2`` (EigenPro2 and its solver), ``preconditioner``
(Nystrom spectrum, critical batch size, step size), ``blocks`` (chunked kernel
products), ``utils`` (accuracy, load_dataset), ``datasets`` (CustomDataset) and,
with the ``sklearn`` extra, ``sklearn`` (KernelRegressor, KernelClassifier).
"""

from eigenpro3 import datasets, kernels, utils
from eigenpro3.datasets import CustomDataset
from eigenpro3.eigenpro2 import EigenPro2, eigenpro2_solve
from eigenpro3.kernels import dispersal, gaussian, get_kernel, laplacian, ntk_relu
from eigenpro3.models import KernelModel
from eigenpro3.preconditioner import Nystrom, build_nystrom
from eigenpro3.utils import accuracy, load_dataset

__all__ = [
    "CustomDataset",
    "EigenPro2",
    "KernelModel",
    "Nystrom",
    "accuracy",
    "build_nystrom",
    "datasets",
    "dispersal",
    "eigenpro2_solve",
    "gaussian",
    "get_kernel",
    "kernels",
    "laplacian",
    "load_dataset",
    "ntk_relu",
    "utils",
]

__version__ = "0.1.0"
