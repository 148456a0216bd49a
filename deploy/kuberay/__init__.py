"""KubeRay manifests (RayJob, RayService) and the command that keeps serveConfigV2 equal to serve/config.yaml."""
