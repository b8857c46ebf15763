"""What is built on a store and an SAE: the feature index (`index`) and the HTTP query service (`api`, `static`)."""
