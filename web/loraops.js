// LoRA Ops front-end extension. Served by ComfyUI through WEB_DIRECTORY as /extensions/<pack>/loraops.js.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "loraops.core",
});
