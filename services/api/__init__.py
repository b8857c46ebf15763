"""The query service: a FastAPI app over one feature index (`actstore serve --index DIR [--compare CMP]`).

    GET /features/{id}              stats, top images with per-patch values, value bands, explanations
    GET /features?sort=&min_freq=&max_freq=&offset=&limit=     browse and filter by density
    GET /features?q=                search the explanations (from `actstore explain`), most relevant first
    GET /features/{id}/matches      its best match and assigned partner in the other SAE of CMP, with
                                    their top images (404 without --compare)
    GET /images/{id}                the image as the model saw it (JPEG), from the store's dataset
                                    (?other=true: from the other SAE's index, with --compare)
    GET /images/{id}/features       the image's strongest features
    GET /stats/density-histogram    log10 firing frequency across features
    GET /atlas                      UMAP and PCA of the decoder directions (from `actstore atlas`)
    GET /abstraction                the features per depth of a label hierarchy (from `actstore abstraction`;
                                    each feature's level is in /features/{id})
    POST /steer, GET /steer/heads   features edited inside the model, before and after (with --steer; `steering`)
    GET /images/{id}/patches/{p}    the SAE's features at a patch (with --steer)
    GET /healthz                    liveness, the index's shape, the steering model's state
    GET /                           the feature browser (services/static/)

Modules, in the order a request meets them: `app` (create_app wires the rest), `deps` (the readers
and the bearer-token check), `routes` (one router per resource), `reader` (the index folder, no HTTP),
`explanations` (the features' explanations and their search, no HTTP), `matches` (the comparison and the other
SAE's index, no HTTP), `steering` (the model, its slots and time bound), `geometry` (the region the model saw),
`schemas` (the OpenAPI response models), `errors` (the project's errors as HTTP codes, in one place); `runners`
serves it with uvicorn or Ray Serve, and `config` holds `actstore serve`'s settings.

Why it is fast: the index's arrays and its image table are memory-mapped (services.index.layout.open_array,
open_image_table: the workers share one copy), features.parquet is 6 small columns, and nothing here imports torch
(nor pandas), so start-up is well under a second and a feature lookup is a few memory-mapped rows serialized by
orjson. Feature endpoints are `async def` (no thread hop); image endpoints decode files, so they run in the thread
pool and are LRU-cached.

Safety: 127.0.0.1 by default; with a token, every API route and the schema and docs need
`Authorization: Bearer <token>` (the page and /healthz do not; the page keeps the token out of URLs); an image is
read only when its store row is "ok" and its file lies under the dataset root that the index recorded
(services.index.layout.dataset_root, symlinks resolved); the other SAE's images only under the dataset root of the
index that the comparison recorded for it.
"""

from services.api.app import TOKEN_ENV, create_app
from services.api.geometry import model_view
from services.api.reader import IndexReader
from services.api.runners import run, run_ray

__all__ = ["TOKEN_ENV", "IndexReader", "create_app", "model_view", "run", "run_ray"]
