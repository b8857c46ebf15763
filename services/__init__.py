"""What is built on a store and an SAE: the SAE back in its model (`spliced`; `evaluate`, `steer`), linear probes
(`probe`), the feature index (`index`), comparisons (`compare`), reports (`report`) and the HTTP query service
(`api`, `static`)."""
